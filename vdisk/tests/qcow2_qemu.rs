//! qcow2 interop with QEMU's tools: `qemu-img check` is the oracle for every image we
//! write, and images qemu-img/qemu-io write must read back through our code.
//!
//! Missing tools follow the workspace policy (tests/src/lib.rs): skip loudly locally,
//! fail in CI (env CI set), where .ci/run installs qemu-utils.

mod util;

use std::path::{Path, PathBuf};
use std::process::Output;

use util::{ok, qemu_check, require, run, s};

use rand::{Rng, SeedableRng};
use vdisk::qcow2::{OpenOptions, Qcow2};

const MIB: u64 = 1 << 20;

fn vdisk(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_vdisk"), args)
}

fn random_writes(img: &mut Qcow2, model: &mut [u8], seed: u64, n: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    for _ in 0..n {
        let len = rng
            .random_range(1..=2 * img.cluster_size() + 1000)
            .min(size);
        let off = rng.random_range(0..=size - len);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        img.write(off, &data).expect("write");
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
}

fn write_raw(path: &Path, data: &[u8]) -> PathBuf {
    std::fs::write(path, data).expect("write raw");
    path.to_path_buf()
}

#[test]
fn our_images_pass_qemu_check_compare_convert() {
    if !require("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    for (i, cs) in [4096u64, 65536, 2 * MIB].into_iter().enumerate() {
        let img_path = d.path().join(format!("ours-{cs}.qcow2"));
        let size = 24 * MIB;
        let mut img = Qcow2::create(&img_path, size, cs, None).expect("create");
        let mut model = vec![0u8; size as usize];
        random_writes(&mut img, &mut model, 100 + i as u64, 60);
        img.discard(3 * MIB, 2 * MIB).expect("discard");
        let a = (3 * MIB).next_multiple_of(cs) as usize;
        let b = ((5 * MIB) / cs * cs) as usize;
        if b > a {
            model[a..b].fill(0);
        }
        img.write_zeroes(10 * MIB + 7, 3 * cs, false)
            .expect("zeroes");
        model[(10 * MIB + 7) as usize..(10 * MIB + 7 + 3 * cs) as usize].fill(0);
        img.close().expect("close");

        qemu_check(&img_path);
        let raw = write_raw(&d.path().join(format!("expect-{cs}.raw")), &model);
        ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", s(&img_path), s(&raw)],
        );
        let conv = d.path().join(format!("conv-{cs}.raw"));
        ok(
            "qemu-img",
            &["convert", "-O", "raw", s(&img_path), s(&conv)],
        );
        assert!(
            std::fs::read(&conv).expect("converted") == model,
            "convert differs"
        );
        let info = ok("qemu-img", &["info", "--output=json", s(&img_path)]);
        let v: serde_json::Value = serde_json::from_str(&info).expect("json");
        assert_eq!(v["virtual-size"], size);
        assert_eq!(v["cluster-size"], cs);
    }
}

#[test]
fn qemu_made_images_read_back() {
    if !require("qemu-img") || !require("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    for cs in ["4k", "64k", "2M"] {
        let p = d.path().join(format!("q-{cs}.qcow2"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                s(&p),
                "16M",
            ],
        );
        let writes: [(u64, u64, u8); 4] = [
            (0, 3 * MIB, 0xab),
            (70_000, 5_000, 0xcd),
            (9 * MIB - 512, 4096, 0x11),
            (15 * MIB, MIB, 0x77),
        ];
        let mut model = vec![0u8; 16 * MIB as usize];
        for (off, len, pat) in writes {
            ok(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -P {pat:#x} {off} {len}"),
                    s(&p),
                ],
            );
            model[off as usize..(off + len) as usize].fill(pat);
        }
        ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -z {} 65536", 15 * MIB),
                s(&p),
            ],
        );
        model[15 * MIB as usize..15 * MIB as usize + 65536].fill(0);
        let mut img = Qcow2::open(&p, &OpenOptions::read_only()).expect("open");
        let mut buf = vec![0u8; 16 * MIB as usize];
        img.read(0, &mut buf).expect("read");
        assert!(buf == model, "cluster size {cs}: data differs");
        let r = img.check(false, &mut |_, _| {}).expect("check");
        assert!(
            r.leaks == 0 && r.refcount_errors == 0 && r.corruptions.is_empty(),
            "{r:?}"
        );

        // Snapshots made by qemu-img: listed, revertible by us. Our read-only open locks
        // writers out, as QEMU's would, so it goes first.
        drop(img);
        ok("qemu-img", &["snapshot", "-c", "before", s(&p)]);
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x99 0 1M", s(&p)],
        );
        let mut img = Qcow2::open(&p, &OpenOptions::default()).expect("open rw");
        assert_eq!(img.list_snapshots()[0].name, "before");
        img.revert_snapshot("before").expect("revert");
        img.read(0, &mut buf).expect("read");
        assert!(buf == model, "cluster size {cs}: revert differs");
        img.write(MIB, &[5; 100]).expect("write");
        img.close().expect("close");
        qemu_check(&p);
        let out = ok(
            "qemu-io",
            &["-f", "qcow2", "-c", &format!("read -P 5 {MIB} 100"), s(&p)],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

#[test]
fn qemu_overlays_read_through_backing_files() {
    if !require("qemu-img") || !require("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let pattern: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 253) as u8).collect();
    let raw = write_raw(&d.path().join("base.raw"), &pattern);
    let base_q = d.path().join("base.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", s(&raw), s(&base_q)]);
    for (base, fmt) in [(&raw, "raw"), (&base_q, "qcow2")] {
        let top = d.path().join(format!("top-{fmt}.qcow2"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                s(base),
                "-F",
                fmt,
                s(&top),
            ],
        );
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x42 100000 70000", s(&top)],
        );
        let mut model = pattern.clone();
        model[100_000..170_000].fill(0x42);
        let mut img = Qcow2::open(&top, &OpenOptions::default()).expect("open");
        assert_eq!(img.backing().map(|b| b.format()), Some(fmt));
        let mut buf = vec![0u8; 8 * MIB as usize];
        img.read(0, &mut buf).expect("read");
        assert!(buf == model, "{fmt}: data differs");
        // Our copy-on-write from the backing file, checked by qemu-img.
        img.write(3 * MIB + 5, &[0xee; 10]).expect("write");
        model[(3 * MIB + 5) as usize..(3 * MIB + 15) as usize].fill(0xee);
        img.close().expect("close");
        qemu_check(&top);
        let exp = write_raw(&d.path().join(format!("exp-{fmt}.raw")), &model);
        ok("qemu-img", &["compare", "-F", "raw", s(&top), s(&exp)]);
    }
}

#[test]
fn cli_create_info_snapshots_and_check() {
    if !require("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().expect("tempdir");
    let base = write_raw(&d.path().join("base.raw"), &vec![3u8; 2 * MIB as usize]);
    let img = d.path().join("cli.qcow2");
    let out = vdisk(&[
        "image",
        "create",
        s(&img),
        "--size",
        "4M",
        "--cluster-size",
        "4K",
        "--backing",
        s(&base),
    ]);
    assert!(out.status.success(), "{out:?}");
    qemu_check(&img);
    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", s(&img)])).expect("json");
    assert_eq!(info["virtual-size"], 4 * MIB);
    assert_eq!(info["backing-filename-format"], "raw");
    let ours: serde_json::Value =
        serde_json::from_slice(&vdisk(&["image", "info", s(&img), "--json"]).stdout)
            .expect("our json");
    assert_eq!(ours["virtual-size"], 4 * MIB);
    assert_eq!(ours["cluster-size"], 4096);
    assert_eq!(ours["backing-chain"][0]["format"], "raw");
    assert_eq!(ours["dirty"], false);

    let write = |byte: u8| {
        let mut q = Qcow2::open(&img, &OpenOptions::default()).expect("open");
        q.write(MIB - 100, &vec![byte; 300_000]).expect("write");
        q.close().expect("close");
    };
    let read = || {
        let mut q = Qcow2::open(&img, &OpenOptions::read_only()).expect("open");
        let mut b = vec![0u8; 4 * MIB as usize];
        q.read(0, &mut b).expect("read");
        b
    };
    write(1);
    let v1 = read();
    assert!(vdisk(&["snapshot", "create", s(&img), "first"])
        .status
        .success());
    qemu_check(&img);
    let list = ok("qemu-img", &["snapshot", "-l", s(&img)]);
    assert!(list.contains("first"), "{list}");
    write(2);
    qemu_check(&img);
    assert_ne!(read(), v1);
    let listed =
        String::from_utf8_lossy(&vdisk(&["snapshot", "list", s(&img)]).stdout).into_owned();
    assert!(listed.contains("first"), "{listed}");
    assert!(vdisk(&["snapshot", "revert", s(&img), "first"])
        .status
        .success());
    qemu_check(&img);
    assert!(read() == v1);
    write(4);
    let before = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .expect("stat");
    assert!(vdisk(&["snapshot", "delete", s(&img), "first"])
        .status
        .success());
    qemu_check(&img);
    let after = std::fs::metadata(&img)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .expect("stat");
    assert!(
        after < before,
        "deleting the snapshot freed nothing ({before} -> {after} blocks)"
    );
    assert!(!ok("qemu-img", &["snapshot", "-l", s(&img)]).contains("first"));
    assert!(
        vdisk(&["snapshot", "revert", s(&img), "first"])
            .status
            .code()
            != Some(0)
    );

    // A leak: a refcount for a cluster nothing references. Not corruption (exit 0);
    // --repair frees it and qemu-img agrees.
    let q = Qcow2::open(&img, &OpenOptions::read_only()).expect("open");
    let table = q.header().refcount_table_offset;
    drop(q);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .expect("raw");
    use std::os::unix::fs::FileExt;
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, table).expect("reftable");
    let block0 = u64::from_be_bytes(e);
    // A free cluster inside the file (the snapshot delete above freed some).
    let file_clusters = f.metadata().expect("stat").len() / 4096;
    let mut block = vec![0u8; 4096];
    f.read_exact_at(&mut block, block0).expect("refcount block");
    let free_cluster = (1..file_clusters)
        .find(|&c| block[c as usize * 2..c as usize * 2 + 2] == [0, 0])
        .expect("a free cluster inside the file");
    f.write_all_at(&1u16.to_be_bytes(), block0 + free_cluster * 2)
        .expect("leak");
    assert_eq!(
        run("qemu-img", &["check", s(&img)]).status.code(),
        Some(3),
        "qemu sees a leak"
    );
    let out = vdisk(&["image", "check", s(&img)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 leaked"),
        "{out:?}"
    );
    assert!(vdisk(&["image", "check", s(&img), "--repair"])
        .status
        .success());
    qemu_check(&img);

    // Corruption: the refcount of a used data cluster dropped to 0.
    let mut q = Qcow2::open(&img, &OpenOptions::read_only()).expect("open");
    let host = match q.map(MIB, 4096).expect("map").kind {
        vdisk::qcow2::ExtentKind::Data { host_offset, .. } => host_offset,
        k => panic!("expected data, got {k:?}"),
    };
    drop(q);
    f.write_all_at(&0u16.to_be_bytes(), block0 + host / 4096 * 2)
        .expect("corrupt");
    let out = vdisk(&["image", "check", s(&img)]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(vdisk(&["image", "check", s(&img), "--repair"])
        .status
        .success());
    assert_eq!(vdisk(&["image", "check", s(&img)]).status.code(), Some(0));
    qemu_check(&img);
}

/// `vdisk image convert`: a linked clone flattened to raw, and the raw back into a sparse
/// qcow2; qemu-img compares each with its source.
#[test]
fn convert_flattens_and_keeps_zeros_unallocated() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let mut base = vec![0u8; 4 * MIB as usize];
    base[..MIB as usize].fill(0x11);
    std::fs::write(p("base.raw"), &base).expect("base");
    let mut ov =
        Qcow2::create(&p("ov.qcow2"), 4 * MIB, 64 << 10, Some(&p("base.raw"))).expect("overlay");
    ov.write(2 * MIB, &vec![0x22u8; 100 << 10]).expect("write");
    ov.write(MIB - 4096, &[0x33u8; 8192])
        .expect("write across the base's data");
    ov.close().expect("close");
    let vdisk = env!("CARGO_BIN_EXE_vdisk");
    let (ov, flat, back) = (p("ov.qcow2"), p("flat.raw"), p("back.qcow2"));
    ok(
        vdisk,
        &[
            "image",
            "convert",
            "--format",
            "qcow2",
            s(&ov),
            s(&flat),
            "--to",
            "raw",
        ],
    );
    ok(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&ov), s(&flat)],
    );
    ok(
        vdisk,
        &[
            "image",
            "convert",
            s(&flat),
            s(&back),
            "--cluster-size",
            "4K",
        ],
    );
    ok(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&back), s(&flat)],
    );
    qemu_check(&back);
    let img = Qcow2::open(&back, &OpenOptions::read_only()).expect("open");
    assert!(img.backing().is_none(), "flattened");
    let allocated = img.allocated_bytes().expect("allocated");
    assert!(
        allocated < 2 * MIB,
        "zeros must stay unallocated: {allocated} bytes allocated for ~1.1 MiB of data"
    );
    let out = run(vdisk, &["image", "convert", s(&flat), s(&back)]);
    assert!(!out.status.success(), "an existing target must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
