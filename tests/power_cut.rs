//! Power cuts, simulated on a real file system: the database and walship's state directory (its
//! spool with it) live on a journaled ext4 in an image file attached to a loop device; a cut
//! kills every process that writes there (SIGKILL) and copies the image at once.
//!
//! Why the copy is the disk after a power cut: the loop device completes a write only once it
//! is in the image file, so the image holds every write the file system issued and nothing
//! that was only in its page cache (dirty pages, an uncommitted journal transaction). The file
//! system is mounted with `commit=600` and a round lasts seconds, well under the kernel's 30 s
//! write-back of dirty pages, so nothing reaches the image unless a process synced it: what an
//! fsync did not make durable is lost, as it would be. Mounting the copy replays its journal.
//! What it does not model: a device that loses writes it completed but did not flush (the loop
//! device has no volatile cache), or a write torn inside a block.
//!
//! The harness checks itself before the test: a file written and synced survives a cut, one
//! written without a sync does not, or the test fails (it would prove nothing).
//!
//! A cut is also a reboot: walship reads the machine's boot id from a file of the test's
//! (`WALSHIP_FAILPOINT_BOOT_ID_FILE`), which gets a new id at every cut, as
//! `/proc/sys/kernel/random/boot_id` would.

use crate::util::*;
use rand::RngExt;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// Runs a system command; panics with its output unless it succeeds.
fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let o = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        o.status.success(),
        "{program} {:?} failed ({}): {}{}",
        args.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// An ext4 image mounted through a loop device; detached on drop.
struct LoopDisk {
    image: PathBuf,
    mnt: PathBuf,
    dev: Option<String>,
}

impl LoopDisk {
    /// A new sparse image of `mib` MiB, formatted (journaled ext4) and mounted at `mnt`.
    fn create(image: &Path, mnt: &Path, mib: u64) -> LoopDisk {
        let f = fs::File::create(image).expect("create image");
        f.set_len(mib << 20).expect("size image");
        drop(f);
        run(
            "mkfs.ext4",
            &[OsStr::new("-q"), OsStr::new("-F"), image.as_os_str()],
        );
        fs::create_dir_all(mnt).expect("mkdir mount point");
        let mut d = LoopDisk {
            image: image.to_owned(),
            mnt: mnt.to_owned(),
            dev: None,
        };
        d.mount();
        d
    }

    fn mount(&mut self) {
        assert!(self.dev.is_none(), "mounted twice");
        let dev = run(
            "losetup",
            &[
                OsStr::new("--find"),
                OsStr::new("--show"),
                self.image.as_os_str(),
            ],
        );
        self.dev = Some(dev.clone());
        run(
            "mount",
            &[
                OsStr::new("-o"),
                OsStr::new("commit=600"),
                OsStr::new(&dev),
                self.mnt.as_os_str(),
            ],
        );
    }

    /// The power cut: every process writing on the disk must be dead already. The image is
    /// copied as it is (once the loop device has no write in flight), the file system is
    /// detached, and the copy, checked by `e2fsck` (which replays its journal), becomes the
    /// disk; then it is mounted again.
    fn cut(&mut self) {
        // The device stays in `self.dev` until it is detached: a step that fails before
        // leaves it for `drop` to detach.
        let dev = self.dev.clone().expect("cut of an unmounted disk");
        let inflight = format!("/sys/block/{}/inflight", dev.trim_start_matches("/dev/"));
        poll(
            "the loop device to finish its writes in flight",
            10 * SEC,
            || {
                let s = fs::read_to_string(&inflight).ok()?;
                s.split_whitespace().all(|n| n == "0").then_some(())
            },
        );
        let snap = self.image.with_extension("cut");
        run(
            "cp",
            &[
                OsStr::new("--sparse=always"),
                self.image.as_os_str(),
                snap.as_os_str(),
            ],
        );
        run("umount", &[self.mnt.as_os_str()]);
        run("losetup", &["-d", &dev]);
        self.dev = None;
        // 0: clean; 1: the journal was replayed (or errors were fixed). Anything else means
        // the copy is not a disk a power cut could leave: a bug of this harness.
        let st = Command::new("e2fsck")
            .args([OsStr::new("-p"), snap.as_os_str()])
            .output()
            .expect("run e2fsck");
        assert!(
            matches!(st.status.code(), Some(0 | 1)),
            "e2fsck of the image after a simulated power cut: {}: {}{}",
            st.status,
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&st.stderr)
        );
        fs::rename(&snap, &self.image).expect("rename the copy over the image");
        self.mount();
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}

/// Gives the machine a new boot id (see the module doc).
fn new_boot(file: &Path) {
    let id: u128 = rand::random();
    fs::write(file, format!("{id:032x}\n")).expect("write the boot id");
}

/// A new database on the disk mounted at `data/`, and walship replicating it to the sandbox's
/// replica with its state directory on that disk and its boot id from a file of the test's
/// (see the module doc): (database, state directory, boot id file, daemon).
fn replicate_on_disk(sb: &Sandbox) -> (PathBuf, PathBuf, PathBuf, Daemon) {
    sb.create_db();
    let db = sb.db();
    let state = sb.path("data/state");
    let boot = sb.path("boot_id");
    new_boot(&boot);
    let d = Daemon::replicate(&[db.as_os_str(), OsStr::new(&sb.replica_url())], &state)
        .env("WALSHIP_FAILPOINT_BOOT_ID_FILE", &boot)
        .log(&sb.path("daemon.log"))
        .start();
    (db, state, boot, d)
}

/// The harness's own proof that a cut loses what was not synced and keeps what was.
fn assert_cut_drops_unsynced_writes(disk: &mut LoopDisk) {
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let synced = disk.mnt.join("synced");
    let mut f = fs::File::create(&synced).expect("create");
    f.write_all(&data).expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    fs::File::open(&disk.mnt)
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
    let unsynced = disk.mnt.join("unsynced");
    fs::write(&unsynced, &data).expect("write");
    disk.cut();
    assert_eq!(
        fs::read(&synced).ok().as_deref(),
        Some(&data[..]),
        "a synced file did not survive a simulated power cut"
    );
    assert_ne!(
        fs::read(&unsynced).ok().as_deref(),
        Some(&data[..]),
        "a file never synced survived a simulated power cut whole: the simulation keeps \
         writes a power cut loses, and this test would prove nothing"
    );
    let _ = fs::remove_file(&synced);
    let _ = fs::remove_file(&unsynced);
}

/// walship replicates a database while writers commit, and the power goes, again and again:
/// the database and walship's state directory lose what was not synced, the replica (another
/// host) keeps what it received. Writers commit with `synchronous=FULL` (their commits are
/// durable on return); with `normal`, every other round all but one commit with `NORMAL` (a
/// cut may take back commits that walship had already shipped); some of them run flat out in
/// big transactions (a bulk load that walship chases). After every cut walship must start again on what the disk kept, resuming
/// its generation only where that is still the truth; at the end a restore must equal the
/// database page for page, hold every `FULL` commit, and every position reported replicated
/// before a cut must still restore at a commit boundary.
fn power_cuts(scenario: &'static str, normal: bool) {
    let t0 = Instant::now();
    let rounds: usize = std::env::var("WALSHIP_POWER_CUT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let sb = Sandbox::new();
    // The database grows by up to ~20 MiB a bulk round, and a new generation's snapshot of it
    // may sit in the spool beside it: a sparse image sized for the rounds.
    let mib = 1024.max(96 * rounds as u64);
    let mut disk = LoopDisk::create(&sb.path("disk.img"), &sb.path("data"), mib);
    assert_cut_drops_unsynced_writes(&mut disk);

    let (db, state, boot, mut d) = replicate_on_disk(&sb);
    let mut rep = Report::new(scenario);
    rep.rounds = rounds;
    let mut rng = rand::rng();
    let mut durable: Vec<(String, i64)> = Vec::new();
    let mut reported: Vec<String> = Vec::new();
    let mut generations: BTreeSet<String> = BTreeSet::new();
    let paced = WriterOpts {
        commits: 0,
        rate: 100.0,
        big_every: 10,
    };
    // Cuts after which the disk held every commit walship may have shipped, and how many of
    // them walship resumed its generation after.
    let (mut full_cuts, mut resumed) = (0, 0);
    for round in 0..=rounds {
        // FULL rounds: every writer commits with synchronous=FULL, so the disk keeps every
        // commit walship may have read. NORMAL rounds: all but one commit with NORMAL, whose
        // last commits a cut may take back after walship shipped them.
        let full_only = !normal || round % 2 == 0;
        let sync = if full_only { "FULL" } else { "NORMAL" };
        let seed = 7000 + 10 * round as u64;
        let mut ws = vec![
            Writer::spawn_args(
                &db,
                &format!("r{round}full"),
                paced,
                seed,
                &["--synchronous", "FULL"],
            ),
            Writer::spawn_args(
                &db,
                &format!("r{round}{sync}"),
                paced,
                seed + 1,
                &["--synchronous", sync],
            ),
        ];
        // Bulk loads in the first 16 rounds only: a database grown past the spool's limit
        // (256 MiB by default, its snapshot kept) would make the spool drop what a replica
        // lacks in longer runs, which is that limit at work, not a power cut's doing.
        if round < 16 && (round % 4 == 1 || round % 4 == 2) {
            let bulk = WriterOpts {
                commits: 200,
                rate: 0.0,
                big_every: 1,
            };
            ws.push(Writer::spawn_args(
                &db,
                &format!("r{round}bulk{sync}"),
                bulk,
                seed + 2,
                &["--synchronous", sync],
            ));
        }
        let durable_writers = if full_only { ws.len() } else { 1 };
        std::thread::sleep(Duration::from_millis(rng.random_range(300..2500)));
        d.assert_running();
        for w in ws.iter_mut() {
            w.assert_alive_or_ok();
        }
        if round == rounds {
            stop_all(&mut ws);
            durable.extend(committed(&ws[..durable_writers]));
            break;
        }
        let before = d.status();
        if let Some(s) = &before {
            generations.insert(s.generation.clone());
            if s.caught_up() {
                reported.push(s.position.clone());
            }
        }
        for (_, p) in replica_positions(&state) {
            reported.push(p.position());
        }
        // Writers first: walship's death lets a writer that lives on a moment checkpoint and
        // restart the WAL past what walship captured (a new generation at the next start),
        // which a power cut, killing everything at once, does not.
        for w in ws.iter_mut() {
            w.kill9();
        }
        d.kill9();
        durable.extend(committed(&ws[..durable_writers]));
        disk.cut();
        new_boot(&boot);
        let t = Instant::now();
        d.restart();
        let s = d.wait_status("start-up after a power cut", 60 * SEC, |_| true);
        rep.recovered(t.elapsed());
        generations.insert(s.generation.clone());
        if let (true, Some(b)) = (full_only, before) {
            full_cuts += 1;
            resumed += usize::from(b.generation == s.generation);
        }
    }
    d.wait_caught_up(60 * SEC);
    d.stop();
    let restored = sb.path("final.db");
    restore(&restored, &sb.replica_url(), &[]).assert_ok();
    let all = rows(&restored);
    rep.commits(&all, &durable);
    let temps = rep.temp_files_in(&state);
    rep.log(&d);
    rep.finish();
    assert_same_db(&db, &restored);
    assert_prefixes(&all, "the final restore");
    assert_contains_all(&all, &durable, "synchronous=FULL commits after power cuts");
    assert!(
        temps.is_empty(),
        "temporary files left in the state directory after a clean stop: {temps:?}"
    );

    reported.sort();
    reported.dedup();
    assert_reported_positions_restore(&sb, &d, &reported, "power cut", |_, _| {});
    let log = d.log_text();
    let why: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("starting a new generation: ").map(|(_, w)| w))
        .collect();
    eprintln!("{scenario}: new generations: {why:#?}");
    // A replica's position that a cut set back while the spool's removal of the files it
    // held survived made walship send it a whole new snapshot.
    let resent: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("asking for a fresh snapshot"))
        .collect();
    assert!(
        resent.is_empty(),
        "a replica was sent a fresh snapshot after a power cut: {resent:#?}"
    );
    // Before walship's start stopped checkpointing the WAL away, it resumed after none.
    assert!(
        full_cuts < 2 || resumed >= 1,
        "walship resumed its generation after none of {full_cuts} cuts that kept every commit; log:\n{log}"
    );
    eprintln!(
        "{scenario}: {rounds} cuts, resumed after {resumed} of {full_cuts} that kept every commit, {} rows, {} durable commits' rows, {} generations, {} reported positions checked, {:?}",
        all.len(),
        durable.len(),
        generations.len(),
        reported.len(),
        t0.elapsed()
    );
}

/// Power cuts under writers at `synchronous=FULL` (what CI runs).
#[test]
fn e2e_power_cut() {
    power_cuts("power cut (database and state on one disk)", false);
}

/// Power cuts with writers at `synchronous=NORMAL` in every other round: a cut takes back
/// their last commits, possibly after walship shipped them.
#[test]
fn e2e_power_cut_synchronous_normal() {
    power_cuts("power cut, applications at synchronous=NORMAL", true);
}

/// The power goes while walship chases a bulk load, whose segments it publishes in its spool
/// without a sync until replicas hold them: after a kill of walship alone (the same boot,
/// the page cache kept them) it resumes its generation; after a power cut (a new boot, they
/// may be lost) it starts a new one, and the replica restores to the database either way.
#[test]
fn e2e_power_cut_during_a_chase() {
    let sb = Sandbox::new();
    let mut disk = LoopDisk::create(&sb.path("disk.img"), &sb.path("data"), 1024);
    let (db, state, boot, mut d) = replicate_on_disk(&sb);
    let first = d.wait_caught_up(30 * SEC);
    let mark = state.join("volatile");
    let bulk = WriterOpts {
        commits: 0,
        rate: 0.0,
        big_every: 1,
    };
    // Kills the bulk writer, then walship, while the mark is set (tried again when the mark
    // was cleared in between).
    let kill_in_chase = |d: &mut Daemon, seed: u64| {
        for attempt in 0..10 {
            let mut w = Writer::spawn_args(
                &db,
                &format!("bulk{seed}-{attempt}"),
                bulk,
                seed + attempt,
                &["--synchronous", "FULL"],
            );
            let t = Instant::now();
            let mut seen = false;
            while !seen && t.elapsed() < 20 * SEC {
                std::thread::sleep(Duration::from_millis(5));
                seen = mark.exists();
            }
            w.kill9();
            d.kill9();
            if seen && mark.exists() {
                return;
            }
            d.restart();
            d.wait_caught_up(60 * SEC);
        }
        panic!(
            "no chase was under way at any of 10 kills (no {} seen)",
            mark.display()
        );
    };

    // walship alone dies: the same boot.
    kill_in_chase(&mut d, 100);
    d.restart();
    let s = d.wait_caught_up(60 * SEC);
    assert_eq!(
        s.generation,
        first.generation,
        "walship killed in a chase, the same boot: a new generation; log:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(
        log.contains("found the mark of spool files published without a sync")
            && log.contains("same_boot=true"),
        "walship killed in a chase did not find the mark at its next start; log:\n{log}"
    );
    assert!(
        !log.contains("the machine restarted while spool files"),
        "{log}"
    );

    // The power goes: a new boot.
    kill_in_chase(&mut d, 200);
    disk.cut();
    new_boot(&boot);
    d.restart();
    let s = d.wait_caught_up(60 * SEC);
    let log = d.log_text();
    assert!(
        log.contains("the machine restarted while spool files"),
        "{log}"
    );
    assert_ne!(s.generation, first.generation, "{log}");
    assert!(
        !mark.exists(),
        "the mark stayed once the new generation was spooled"
    );
    for l in log.lines().filter(|l| {
        l.contains("mark") || l.contains("generation:") || l.contains("restarted while")
    }) {
        eprintln!("{l}");
    }
    d.stop();
    let restored = sb.path("final.db");
    restore(&restored, &sb.replica_url(), &[]).assert_ok();
    assert_same_db(&db, &restored);
    assert_prefixes(&rows(&restored), "the restore after a power cut in a chase");
}
