//! A TCP stream between two guests, timed: what iperf3 would measure, small enough for the
//! test guest's initramfs, with no dependency but std so that it links statically.
//!
//! `tcpblast recv PORT` takes one connection and reads it to the end with large reads;
//! `tcpblast send HOST PORT MIB` connects (retrying while the listener is not up yet),
//! writes MIB MiB with large writes, and waits for the receiver to close. Each prints
//! `BYTES SECONDS`, timed from the first byte to the last (the receiver) or from the
//! connection to the receiver's close (the sender).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Bytes per read or write: large enough that the system calls, costly under TCG, are not
/// what is measured.
const CHUNK: usize = 256 << 10;

fn recv(port: u16) -> io::Result<(u64, Duration)> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let (mut s, _) = listener.accept()?;
    let mut buf = vec![0u8; CHUNK];
    let first = s.read(&mut buf)?;
    let start = Instant::now();
    let mut total = first as u64;
    if first > 0 {
        loop {
            match s.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
    }
    let elapsed = start.elapsed();
    // The sender waits for this close: its time then includes the delivery.
    drop(s);
    Ok((total, elapsed))
}

fn send(host: &str, port: u16, mib: u64) -> io::Result<(u64, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match TcpStream::connect((host, port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    let buf = vec![0x5au8; CHUNK];
    let total = mib << 20;
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = [0u8; 64];
    while s.read(&mut rest)? > 0 {}
    Ok((total, start.elapsed()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse_port = |s: &str| s.parse::<u16>().ok();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["recv", port] => match parse_port(port) {
            Some(p) => recv(p),
            None => return usage(),
        },
        ["send", host, port, mib] => match (parse_port(port), mib.parse::<u64>().ok()) {
            (Some(p), Some(m)) => send(host, p, m),
            _ => return usage(),
        },
        _ => return usage(),
    };
    match result {
        Ok((bytes, elapsed)) => {
            println!("{bytes} {:.3}", elapsed.as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tcpblast: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: tcpblast recv PORT | tcpblast send HOST PORT MIB");
    ExitCode::from(2)
}
