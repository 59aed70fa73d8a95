//! The control socket of a serving vdisk, and what `vdisk ctl` asks it: the image and its
//! usage, the counters, and snapshots of a qcow2 image taken while the guest runs.

use std::os::unix::fs::MetadataExt;

use serde_json::{json, Value};
use tracing::info;

use crate::backend::BlkBackend;
use crate::image::Format;
use crate::translate::lock;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The image, its format, virtual and allocated size.
    Info,
    /// The device's counters.
    Stats,
    /// An internal snapshot of the image as it is now (qcow2).
    SnapshotCreate {
        name: String,
    },
    SnapshotList,
}

/// Answer the control socket forever (on its own thread).
pub fn serve(
    backend: BlkBackend,
    sock: common::socket::ClaimedSocket,
    access: &common::access::PeerPolicy,
) {
    common::control::serve(&sock, access, move |req| handle(&backend, req));
}

fn error(e: impl std::fmt::Display) -> Value {
    json!({ "error": e.to_string() })
}

fn handle(backend: &BlkBackend, req: Request) -> Value {
    let dev = backend.device();
    match req {
        Request::Info => {
            let path = dev.image.path();
            let allocated = std::fs::metadata(path).map(|m| m.blocks() * 512).ok();
            let mut v = json!({
                "image": path.display().to_string(),
                "virtual_size": dev.limits.capacity_sectors << crate::request::SECTOR_SHIFT,
                "allocated_size": allocated,
                "read_only": dev.limits.read_only,
                "queues": dev.num_queues,
            });
            match &dev.format {
                Format::Raw => v["format"] = json!("raw"),
                Format::Qcow2(q) => {
                    let image = lock(q);
                    v["format"] = json!("qcow2");
                    v["cluster_size"] = json!(image.cluster_size());
                    v["snapshots"] = json!(image.list_snapshots().len());
                    v["backing"] = json!(image.backing().map(|b| b.path().display().to_string()));
                }
            }
            v
        }
        Request::Stats => {
            let mut counters: serde_json::Map<String, Value> = dev
                .stats
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            if let Format::Qcow2(q) = &dev.format {
                let c = lock(q).counters();
                counters.insert("allocated_clusters".into(), json!(c.allocated_clusters));
                counters.insert("freed_clusters".into(), json!(c.freed_clusters));
                counters.insert("cow_clusters".into(), json!(c.cow_clusters));
                counters.insert("metadata_syncs".into(), json!(c.syncs));
                if let Some(d) = lock(q).dedupe_stats() {
                    if let Ok(Value::Object(m)) = serde_json::to_value(d) {
                        for (k, v) in m {
                            counters.insert(format!("dedupe_{k}"), v);
                        }
                    }
                    counters.insert("dedupe_ratio".into(), json!(d.ratio()));
                }
            }
            json!({ "counters": counters })
        }
        Request::SnapshotCreate { name } => {
            let Format::Qcow2(q) = &dev.format else {
                return error("snapshots need a qcow2 image; this one is raw");
            };
            // Writes, discards and flushes apply under this lock (see `translate`), so
            // holding it is the quiesce point: the snapshot has every write that completed
            // before, and none that completes after.
            let mut image = lock(q);
            let result = image.flush().and_then(|()| image.create_snapshot(&name));
            match result {
                Ok(()) => {
                    info!(image = %dev.image.path().display(), snapshot = %name, "snapshot created");
                    json!({ "ok": true })
                }
                Err(e) => error(e),
            }
        }
        Request::SnapshotList => {
            let Format::Qcow2(q) = &dev.format else {
                return json!({ "snapshots": [] });
            };
            let image = lock(q);
            let list: Vec<Value> = image
                .list_snapshots()
                .iter()
                .map(|s| {
                    json!({
                        "id": s.id,
                        "name": s.name,
                        "disk_size": s.disk_size,
                        "date_sec": s.date_sec,
                    })
                })
                .collect();
            json!({ "snapshots": list })
        }
    }
}

/// Human-readable text for a reply to `req`.
pub fn render(req: &Request, reply: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    match req {
        Request::Info | Request::Stats => {
            let obj = match req {
                Request::Stats => reply.get("counters").unwrap_or(reply),
                _ => reply,
            };
            if let Some(map) = obj.as_object() {
                for (k, v) in map {
                    out.push_str(&format!("{k:<20} {}\n", text(v)));
                }
            }
        }
        Request::SnapshotCreate { name } => out.push_str(&format!("snapshot {name} created\n")),
        Request::SnapshotList => {
            out.push_str(&format!(
                "{:<6} {:<24} {:>20} {:>12}\n",
                "ID", "NAME", "DISK SIZE", "DATE (s)"
            ));
            for s in reply
                .get("snapshots")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.push_str(&format!(
                    "{:<6} {:<24} {:>20} {:>12}\n",
                    text(&s["id"]),
                    text(&s["name"]),
                    text(&s["disk_size"]),
                    text(&s["date_sec"])
                ));
            }
        }
    }
    out
}
