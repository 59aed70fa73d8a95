//! fio with io_uring straight on the image file: the ceiling the daemons are compared with.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use std::io::Read;

use super::daemon::{contain, cpu_time};
use super::{Measurement, Op, Pattern, Workload};
use crate::signals;

/// The fio command line for `wl` on `image`: one job per queue, each at the workload's QD.
pub fn command(
    image: &Path,
    wl: &Workload,
    direct: bool,
    warmup: Duration,
    runtime: Duration,
) -> Command {
    let rw = match (wl.op, wl.pattern) {
        (Op::Read, Pattern::Random) => "randread".to_string(),
        (Op::Write, Pattern::Random) => "randwrite".to_string(),
        (Op::Read, Pattern::Sequential) => "read".to_string(),
        (Op::Write, Pattern::Sequential) => "write".to_string(),
        // fio's offset modifier: skip this much after each request. fio has no random order
        // without repeats at a stride, so a shuffled one runs in order.
        (Op::Read, Pattern::Stride { stride, .. }) => {
            format!("read:{}", stride.saturating_sub(wl.bs as u64))
        }
        (Op::Write, Pattern::Stride { stride, .. }) => {
            format!("write:{}", stride.saturating_sub(wl.bs as u64))
        }
    };
    let mut cmd = Command::new("fio");
    cmd.arg("--name=bench")
        .arg(format!("--filename={}", image.display()))
        .arg("--ioengine=io_uring")
        .arg("--invalidate=0")
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", wl.bs))
        .arg(format!("--iodepth={}", wl.qd))
        .arg(format!("--numjobs={}", wl.queues))
        .arg("--norandommap=1")
        .arg("--thread")
        .arg("--lat_percentiles=1")
        .arg("--time_based=1")
        .arg(format!("--ramp_time={}ms", warmup.as_millis().max(1)))
        .arg(format!("--runtime={}ms", runtime.as_millis().max(1)))
        .arg("--output-format=json");
    cmd
}

/// Run fio for `wl` and turn its JSON report into a [`Measurement`].
///
/// CPU time is sampled from /proc like the daemons', over a `runtime`-long window after the
/// ramp: fio's own usr_cpu/sys_cpu leave out the io_uring worker threads (io-wq), which do
/// the buffered writes, and would flatter fio several times over.
pub fn run(
    image: &Path,
    wl: &Workload,
    direct: bool,
    warmup: Duration,
    runtime: Duration,
) -> Result<Measurement, String> {
    signals::check()?;
    let mut cmd = command(image, wl, direct, warmup, runtime);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    contain(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("spawn fio: {e}"))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().ok_or("fio stdout")?;
    let mut stderr = child.stderr.take().ok_or("fio stderr")?;
    let reader = std::thread::spawn(move || {
        let (mut out, mut err) = (String::new(), String::new());
        let _ = stdout.read_to_string(&mut out);
        let _ = stderr.read_to_string(&mut err);
        (out, err)
    });
    // fio starts its ramp within a few ms; sample inside its measured window.
    let sample = (|| {
        sleep_checked(warmup + Duration::from_millis(50))?;
        let c0 = cpu_time(pid)?;
        sleep_checked(runtime - Duration::from_millis(50).min(runtime / 10))?;
        let c1 = cpu_time(pid)?;
        Ok::<_, String>(c1.saturating_sub(c0))
    })();
    if sample.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| format!("wait for fio: {e}"))?;
    let (out, err) = reader.join().map_err(|_| "fio reader thread panicked")?;
    if !status.success() {
        return Err(format!("fio failed ({status}): {}", err.trim()));
    }
    let cpu = sample?;
    let window = (runtime - Duration::from_millis(50).min(runtime / 10)).as_secs_f64();
    let mut m = parse(&out, wl)?;
    // CPU per op = CPU rate over the sampled window / fio's op rate.
    m.cpu_us_per_op = cpu.as_secs_f64() / window * 1e6 / m.iops;
    Ok(m)
}

fn sleep_checked(d: Duration) -> Result<(), String> {
    let end = std::time::Instant::now() + d;
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        signals::check()?;
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    Ok(())
}

/// Sum fio's per-job results (one job per queue). `cpu_us_per_op` is fio's own accounting
/// here; [`run`] replaces it with the /proc measurement.
pub fn parse(json: &str, wl: &Workload) -> Result<Measurement, String> {
    // fio may print warnings before the JSON document.
    let start = json.find('{').ok_or("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&json[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let jobs = v["jobs"].as_array().ok_or("fio JSON: no jobs")?;
    let dir = match wl.op {
        Op::Read => "read",
        Op::Write => "write",
    };
    let num = |j: &Value, path: &[&str]| -> Result<f64, String> {
        let mut x = j;
        for p in path {
            x = &x[*p];
        }
        x.as_f64()
            .ok_or_else(|| format!("fio JSON: missing {}", path.join(".")))
    };
    let (mut iops, mut bw, mut ios, mut lat_weighted, mut p99, mut cpu_s) =
        (0.0, 0.0, 0.0, 0.0, 0.0f64, 0.0);
    for j in jobs {
        if j["error"].as_i64().unwrap_or(0) != 0 {
            return Err(format!("fio job error {}", j["error"]));
        }
        let n = num(j, &[dir, "total_ios"])?;
        iops += num(j, &[dir, "iops"])?;
        bw += num(j, &[dir, "bw_bytes"])?;
        ios += n;
        lat_weighted += num(j, &[dir, "lat_ns", "mean"])? * n;
        p99 = p99.max(num(j, &[dir, "lat_ns", "percentile", "99.000000"]).unwrap_or(0.0));
        let runtime_s = num(j, &[dir, "runtime"])? / 1000.0;
        cpu_s += (num(j, &["usr_cpu"])? + num(j, &["sys_cpu"])?) / 100.0 * runtime_s;
    }
    if ios == 0.0 {
        return Err("fio completed no I/O".to_string());
    }
    Ok(Measurement {
        iops,
        mib_s: bw / (1024.0 * 1024.0),
        lat_mean_us: lat_weighted / ios / 1000.0,
        lat_p99_us: p99 / 1000.0,
        cpu_us_per_op: cpu_s * 1e6 / ios,
        ops_all: ios as u64,
        cut_short: None,
    })
}
