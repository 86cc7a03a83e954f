//! Layer-unpack benchmark: flotilla's `unpack_layer` against GNU tar on the same layer.
//!
//! A synthetic, deterministic layer (default 20,000 files of mixed sizes in ~1,000 directories,
//! plus symlinks and hard links, about 400 MB) is written once to a tar file. Each round unpacks
//! it into a fresh directory on the same disk, alternating between:
//! - flotilla: `image::layer::unpack_layer` with ownership shifted into 100000+ (what a node does
//!   for every layer it pulls);
//! - the anchor: `tar -x --numeric-owner -p` (GNU tar, as root: it restores owners and modes too).
//!
//! The time to hash the stream alone (the diff id every node verifies) is printed beside.
//!
//! Each round starts from a quiet machine with no dirty pages (`sync`), so neither side pays for
//! the other's writeback; the unpacked trees are removed outside the timing.
//!
//! On a disk the figures are mostly the disk's writeback; give a tmpfs (e.g. `/dev/shm`) as the
//! scratch dir to see the CPU and syscall cost of the unpacking itself.
//!
//! Run: `cargo build --release -p flotilla-bench --bin unpack && target/release/unpack [rounds] [files] [scratch-dir]`

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use flotilla_bench::*;
use flotilla_runtime::image::layer::{unpack_layer, HashingReader};
use flotilla_runtime::IdRange;

/// xorshift64*: deterministic file sizes and contents.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A size drawn like a distribution's /usr: mostly small files, a few large ones.
fn file_size(rng: &mut Rng) -> u64 {
    match rng.below(1000) {
        0..=699 => rng.below(4096),
        700..=949 => 4096 + rng.below(28 * 1024),
        950..=994 => 32 * 1024 + rng.below(224 * 1024),
        _ => 256 * 1024 + rng.below(1792 * 1024),
    }
}

/// Writes the layer tar; returns (bytes, files, dirs, symlinks, hardlinks).
fn build_layer(path: &Path, files: usize) -> anyhow::Result<(u64, usize, usize, usize, usize)> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut b = tar::Builder::new(BufWriter::new(File::create(path)?));
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    };
    // ~20 files per directory, directories 1–3 deep under a few top-level ones.
    let ndirs = (files / 20).max(1);
    let mut dirs = Vec::with_capacity(ndirs);
    for top in ["usr/lib", "usr/share", "etc", "opt/app"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("{top}/"), std::io::empty())?;
        dirs.push(top.to_string());
    }
    while dirs.len() < ndirs {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        if parent.matches('/').count() >= 4 {
            continue;
        }
        let d = format!("{parent}/d{}", dirs.len());
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("{d}/"), std::io::empty())?;
        dirs.push(d);
    }
    let mut data = vec![0u8; 2 * 1024 * 1024];
    for chunk in data.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let mut names = Vec::with_capacity(files);
    for i in 0..files {
        let d = &dirs[i % dirs.len()];
        let size = file_size(&mut rng);
        let off = rng.below(data.len() as u64 - size) as usize;
        let mode = if i % 97 == 0 { 0o4755 } else { 0o644 };
        let name = format!("{d}/f{i}");
        let mut h = header(tar::EntryType::Regular, mode, size);
        b.append_data(&mut h, &name, &data[off..off + size as usize])?;
        names.push(name);
    }
    let (mut symlinks, mut hardlinks) = (0, 0);
    for i in 0..files / 40 {
        let target = &names[rng.below(names.len() as u64) as usize];
        let d = &dirs[rng.below(dirs.len() as u64) as usize];
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("{d}/s{i}"), format!("/{target}"))?;
        symlinks += 1;
        if i % 4 == 0 {
            let mut h = header(tar::EntryType::Link, 0o644, 0);
            b.append_link(&mut h, format!("{d}/h{i}"), target)?;
            hardlinks += 1;
        }
    }
    b.into_inner()?.flush()?;
    let bytes = std::fs::metadata(path)?.len();
    Ok((bytes, files, dirs.len(), symlinks, hardlinks))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    pct(&v, 50.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(7);
    let files: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    if !Command::new("tar")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"tar (GNU tar)"))
    {
        bail!("GNU tar is needed for the anchor: apt-get install tar");
    }
    // By default the scratch space sits beside the target dir: the disk a node's data dir
    // would be on.
    let scratch = args.get(3).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        std::path::PathBuf::from,
    );
    let tmp = tempfile::tempdir_in(&scratch)
        .with_context(|| format!("scratch dir under {}", scratch.display()))?;
    println!("machine: {}", machine());
    println!("scratch dir: {}", scratch.display());
    let tar_path = tmp.path().join("layer.tar");
    let (bytes, nfiles, ndirs, nsym, nhard) = build_layer(&tar_path, files)?;
    println!(
        "layer: {:.0} MB tar, {nfiles} files, {ndirs} directories, {nsym} symlinks, {nhard} hard links",
        bytes as f64 / 1e6
    );
    let shift = Some(IdRange::default());
    let mut ours = Vec::new();
    let mut anchor = Vec::new();
    for round in 0..rounds {
        for which in 0..2 {
            let dest = tmp.path().join(format!("r{round}-{which}"));
            std::fs::create_dir(&dest)?;
            Command::new("sync").status()?;
            settle(Duration::from_secs(10));
            let t = Instant::now();
            if which == 0 {
                unpack_layer(File::open(&tar_path)?, &dest, shift)?;
                ours.push(t.elapsed());
            } else {
                let o = Command::new("tar")
                    .args(["-x", "--numeric-owner", "-p", "-f"])
                    .arg(&tar_path)
                    .arg("-C")
                    .arg(&dest)
                    .output()?;
                anchor.push(t.elapsed());
                if !o.status.success() {
                    bail!("tar -x: {}", String::from_utf8_lossy(&o.stderr));
                }
            }
            std::fs::remove_dir_all(&dest)?;
        }
    }
    // What no unpacker can skip on a node: the diff id (sha256 of the whole stream).
    let mut hash = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut r = HashingReader::new(File::open(&tar_path)?);
        std::io::copy(&mut r, &mut std::io::sink())?;
        let _ = r.finish();
        hash.push(t.elapsed());
    }
    let (o, a) = (median(ours), median(anchor));
    println!(
        "unpack, median of {rounds}: flotilla {:.0} ms ({:.0} MB/s), GNU tar {:.0} ms ({:.0} MB/s), ratio {:.2}",
        ms(o),
        bytes as f64 / 1e6 / o.as_secs_f64(),
        ms(a),
        bytes as f64 / 1e6 / a.as_secs_f64(),
        o.as_secs_f64() / a.as_secs_f64()
    );
    println!(
        "of which sha256 of the stream (the diff id; GNU tar computes none): {:.0} ms",
        ms(median(hash))
    );
    Ok(())
}
