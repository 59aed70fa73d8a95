//! The control socket: one JSON request per line, one JSON reply per line. `vswitch ctl`
//! is its client.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::config::QosConfig;
use crate::pmd::Pmds;
use crate::switch::Switch;

/// What `ctl` can ask.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Ports,
    Fdb,
    Stats,
    Pmd,
    SetQos {
        port: String,
        settings: Vec<(String, String)>,
    },
}

fn vlan_text(v: &crate::config::VlanMode) -> String {
    match v {
        crate::config::VlanMode::Access(id) => format!("access {id}"),
        crate::config::VlanMode::Trunk { allowed, native } => {
            let list: Vec<String> = allowed.iter().map(u16::to_string).collect();
            match native {
                Some(n) => format!("trunk {} native {n}", list.join(",")),
                None => format!("trunk {}", list.join(",")),
            }
        }
    }
}

/// Serve the control socket forever (on its own thread).
pub fn serve(
    switch: Arc<Switch>,
    pmds: Arc<Pmds>,
    qos: Vec<QosConfig>,
    sock: common::socket::ClaimedSocket,
    access: &common::access::PeerPolicy,
) {
    let qos = std::sync::Mutex::new(qos);
    common::control::serve(&sock, access, move |req| handle(&switch, &pmds, &qos, req));
}

fn handle(
    switch: &Switch,
    pmds: &Pmds,
    qos: &std::sync::Mutex<Vec<QosConfig>>,
    req: Request,
) -> Value {
    match req {
        Request::Pmd => pmds.show(switch),
        Request::Ports => {
            let qos = match qos.lock() {
                Ok(q) => q.clone(),
                Err(p) => p.into_inner().clone(),
            };
            let ports: Vec<Value> = switch
                .ports
                .iter()
                .zip(qos)
                .map(|(p, q)| {
                    let connected = p.connected();
                    let settings: serde_json::Map<String, Value> = QosConfig::KEYS
                        .iter()
                        .filter_map(|k| {
                            q.get(k)
                                .filter(|v| *v != 0)
                                .map(|v| (k.to_string(), json!(v)))
                        })
                        .collect();
                    json!({
                        "name": p.spec.name,
                        "vlan": vlan_text(&p.spec.vlan),
                        "mac": p.spec.mac.map(|m| m.to_string()),
                        "anti_spoof": p.spec.anti_spoof,
                        "mtu": p.spec.mtu,
                        "queues": p.spec.queues,
                        "guest_connected": connected,
                        "qos": settings,
                    })
                })
                .collect();
            json!({ "ports": ports })
        }
        Request::Fdb => {
            let entries: Vec<Value> = switch
                .fdb_entries()
                .into_iter()
                .map(|(vlan, mac, port, age)| {
                    json!({
                        "vlan": vlan,
                        "mac": mac.to_string(),
                        "port": switch.ports[port].spec.name,
                        "age_s": age.as_secs(),
                    })
                })
                .collect();
            json!({ "fdb": entries })
        }
        Request::Stats => {
            let ports: Vec<Value> = switch
                .ports
                .iter()
                .map(|p| {
                    let counters: serde_json::Map<String, Value> = p
                        .stats
                        .snapshot()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), json!(v)))
                        .collect();
                    json!({ "name": p.spec.name, "counters": counters })
                })
                .collect();
            json!({ "stats": ports })
        }
        Request::SetQos { port, settings } => set_qos(switch, qos, &port, &settings),
    }
}

fn set_qos(
    switch: &Switch,
    qos: &std::sync::Mutex<Vec<QosConfig>>,
    port: &str,
    settings: &[(String, String)],
) -> Value {
    let Some(index) = switch.ports.iter().position(|p| p.spec.name == port) else {
        return json!({ "error": format!("no port named {port}") });
    };
    let mut all = match qos.lock() {
        Ok(q) => q,
        Err(p) => p.into_inner(),
    };
    let mut q = all[index];
    for (k, v) in settings {
        if let Err(e) = q.apply_kv(k, v) {
            return json!({ "error": e.to_string() });
        }
    }
    if let Err(e) = q.validate(switch.ports[index].spec.mtu) {
        return json!({ "error": e.to_string() });
    }
    if let Err(e) = switch.ports[index].qos().update(&q) {
        return json!({ "error": e.to_string() });
    }
    all[index] = q;
    json!({ "ok": true })
}

/// Human-readable text for a reply to `req`.
pub fn render(req: &Request, reply: &Value) -> String {
    let mut out = String::new();
    let list = |key: &str| {
        reply
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let text = |v: &Value, k: &str| match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    };
    match req {
        Request::Ports => {
            out.push_str(&format!(
                "{:<16} {:<28} {:<18} {:>5} {:<9} qos\n",
                "port", "vlan", "mac", "mtu", "guest"
            ));
            for p in list("ports") {
                let guest = if p.get("guest_connected").and_then(Value::as_bool) == Some(true) {
                    "connected"
                } else {
                    "-"
                };
                out.push_str(&format!(
                    "{:<16} {:<28} {:<18} {:>5} {:<9} {}\n",
                    text(&p, "name"),
                    text(&p, "vlan"),
                    text(&p, "mac"),
                    text(&p, "mtu"),
                    guest,
                    text(&p, "qos")
                ));
            }
        }
        Request::Fdb => {
            out.push_str(&format!(
                "{:>5} {:<18} {:<16} {:>6}\n",
                "vlan", "mac", "port", "age s"
            ));
            for e in list("fdb") {
                out.push_str(&format!(
                    "{:>5} {:<18} {:<16} {:>6}\n",
                    text(&e, "vlan"),
                    text(&e, "mac"),
                    text(&e, "port"),
                    text(&e, "age_s")
                ));
            }
        }
        Request::Stats => {
            for p in list("stats") {
                out.push_str(&format!("{}:\n", text(&p, "name")));
                if let Some(c) = p.get("counters").and_then(Value::as_object) {
                    for (k, v) in c {
                        out.push_str(&format!("  {k:<20} {v}\n"));
                    }
                }
            }
        }
        Request::Pmd => {
            let secs =
                |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as f64 / 1e9;
            for t in list("pmds") {
                let core = match t.get("core").and_then(Value::as_u64) {
                    Some(c) => format!("core {c}"),
                    None => "unpinned".to_string(),
                };
                out.push_str(&format!("pmd thread {} ({core}):\n", text(&t, "id")));
                out.push_str(&format!(
                    "  busy {}%: forwarding {:.3} s, polling idle {:.3} s, asleep {:.3} s, {} wakeups\n",
                    text(&t, "busy_pct"),
                    secs(&t, "busy_ns"),
                    secs(&t, "idle_ns"),
                    secs(&t, "sleep_ns"),
                    text(&t, "wakeups"),
                ));
                let avg = t.get("avg_batch").and_then(Value::as_f64).unwrap_or(0.0);
                let batches: Vec<String> = t
                    .get("batches")
                    .and_then(Value::as_object)
                    .map(|b| b.iter().map(|(k, v)| format!("{k}: {v}")).collect())
                    .unwrap_or_default();
                out.push_str(&format!(
                    "  {} frames in {} passes, {avg:.1} per pass (frames per pass {})\n",
                    text(&t, "frames"),
                    text(&t, "passes"),
                    batches.join(", ")
                ));
                for q in t
                    .get("queues")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.push_str(&format!(
                        "  port: {:<16} queue: {:<4} frames: {:>12}  usage: {:>5} %\n",
                        text(q, "port"),
                        text(q, "queue"),
                        text(q, "frames"),
                        text(q, "usage_pct"),
                    ));
                }
            }
        }
        Request::SetQos { port, .. } => out.push_str(&format!("qos of {port} updated\n")),
    }
    out
}
