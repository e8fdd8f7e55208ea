//! Network namespaces for integration tests and the lab: a [`Lab`] creates namespaces, veth
//! pairs between them and processes inside them, and removes all of it when dropped.
//!
//! Invariant: a [`Lab`] only ever changes what it created itself. Every namespace it creates is
//! named `lbt-{tag}-{pid}-{seq}-{short}` (the creating process's pid, a per-process sequence
//! number); links, addresses and routes are only added *inside* those namespaces (a veth pair is
//! created directly in its two namespaces, never in the root namespace); it signals only the
//! processes it spawned, or processes that live inside its own namespaces. When a lab is
//! dropped — including during a panic — it stops those processes (SIGTERM, then SIGKILL after
//! 3 s) and deletes its namespaces. Processes outlive `ip netns del`, so killing comes first.
//!
//! A crashed run cannot drop its lab; [`Lab::new`] therefore first removes the namespaces and
//! the directories (`{temp}/lbt-{tag}-{pid}-…`) of the same tag whose creating process is gone,
//! after killing the processes left inside those namespaces. (So the logs a lab keeps when it
//! is dropped during a panic stay until the next run of the same tag.)
//!
//! **Signals.** A signal's default action ends a process without dropping anything. A command
//! whose labs must not outlive a Ctrl-C (`lb lab demo`, `lb lab experiment`, `lb bench
//! forward`) calls [`remove_labs_on_signal`]: on SIGINT, SIGTERM or SIGHUP its handler thread
//! stops this process's children, removes every namespace and directory of this process's
//! temporary labs, and exits with 128 + the signal. From the moment it starts, no lab of this
//! process creates a namespace or starts a process any more (both happen under the lock the
//! handler keeps until the exit), so nothing made during the cleanup escapes it.
//!
//! **Persistent labs** (`lb lab up`, [`Lab::persistent`]) are named `lbl-{name}-{short}` and are
//! never removed by another lab's stale cleanup. While one is built, [`JOURNAL`] in its
//! directory records every namespace and process so far, so that an interrupted build can be
//! removed. [`Lab::detach`] leaves them running and
//! returns a [`LabRecord`] (namespaces, pids with their start times); a later process
//! [`Lab::reattach`]es it and removes exactly what the record names: only `lbl-{name}-`
//! namespaces, and only processes whose start time is still the recorded one.
//!
//! Everything here needs root (see [`require_root`]) and the `ip` tool (iproute2).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Where `ip netns` keeps one bind-mounted file per named namespace.
const NETNS_RUN_DIR: &str = "/run/netns";

/// How long [`Lab`]'s drop waits after SIGTERM before it sends SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// Labs created so far by this process: makes names unique across parallel tests.
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// This process's temporary labs ([`Lab::new`]) not yet removed: prefix → directory. A lab is
/// in it from its creation to the end of its drop. Its lock is held while a temporary lab
/// creates a namespace or starts a process, and by the signal handler of
/// [`remove_labs_on_signal`] from the signal to the exit.
static TEMPORARY_LABS: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

fn temporary_labs() -> MutexGuard<'static, BTreeMap<String, PathBuf>> {
    TEMPORARY_LABS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Makes SIGINT, SIGTERM and SIGHUP remove this process's temporary labs, then exit (see the
/// [module documentation](self)): the handler thread SIGTERMs this process's children (up to
/// [`TERM_GRACE`] to exit, then SIGKILL), kills what is left inside the labs' namespaces,
/// deletes the namespaces and directories, says so on stderr, and exits with 128 + the
/// signal. Installing it twice is harmless.
pub fn remove_labs_on_signal() -> io::Result<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = (|| {
            let mut signals =
                signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;
            thread::Builder::new()
                .name("lb-lab-signals".into())
                .spawn(move || {
                    if let Some(signal) = signals.forever().next() {
                        remove_temporary_labs(signal);
                    }
                })
                .map(drop)
        })();
    });
    result
}

/// The signal handler's work: never returns.
fn remove_temporary_labs(signal: i32) -> ! {
    // Kept until the exit: no lab of this process creates anything from here on.
    let labs = temporary_labs();
    let name = match signal {
        libc::SIGINT => "SIGINT".to_owned(),
        libc::SIGTERM => "SIGTERM".to_owned(),
        libc::SIGHUP => "SIGHUP".to_owned(),
        other => format!("signal {other}"),
    };
    eprintln!("lb: {name}: removing the lab before exiting");
    signal_children(libc::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while !live_children().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    signal_children(libc::SIGKILL);
    for (prefix, dir) in labs.iter() {
        if let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) {
            for name in entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
            {
                if name.starts_with(&format!("{prefix}-")) {
                    kill_inside(&name);
                    if let Err(e) = run_checked("ip", &["netns", "del", &name]) {
                        eprintln!("lb::netns: cannot delete namespace {name}: {e}");
                    }
                }
            }
        }
        let _ = fs::remove_dir_all(dir);
    }
    eprintln!("lb: the lab's processes, namespaces and files are removed");
    std::process::exit(128 + signal);
}

/// This process's children that are not zombies.
fn live_children() -> Vec<i32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| stat_fields(pid).is_some_and(|(state, ppid)| ppid == me && state != 'Z'))
        .collect()
}

/// Sends `sig` to every live child of this process, each pinned by a pidfd and checked to be
/// our child again before the signal goes through the pidfd (a pid reused meanwhile is not
/// signalled).
fn signal_children(sig: i32) {
    let me = std::process::id();
    for pid in live_children() {
        signal_pinned(pid, sig, || {
            stat_fields(pid).is_some_and(|(_, ppid)| ppid == me)
        });
    }
}

/// A process's state letter and parent pid (`/proc/PID/stat` fields 3 and 4).
fn stat_fields(pid: i32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let mut rest = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Panics with a clear message unless the process runs as root (effective uid 0).
///
/// `what` names the caller, e.g. the test: `needs root: {what} creates network namespaces; …`.
#[track_caller]
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!("needs root: {what} creates network namespaces; run as root (CI does)");
    }
}

/// A named network namespace created by a [`Lab`].
///
/// A cheap handle (the name): it stays usable while its lab lives; after the lab is dropped
/// every operation fails, because the namespace is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    name: String,
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Namespace {
    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args…` and returns its stdout. A failure's error names the command,
    /// its exit status and its stderr.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_checked("ip", &full)
    }

    /// Sets a sysctl of this namespace, e.g. `sysctl("net.ipv4.ip_forward", "1")`.
    ///
    /// Writes `/proc/sys/…` from a thread that entered the namespace (no `sysctl` binary
    /// needed). Keys are dotted; keys whose components contain a dot (VLAN interfaces) are
    /// not supported.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = sysctl_path(key)?;
        let value = value.to_owned();
        let key = key.to_owned();
        self.enter(move || {
            fs::write(&path, value.as_bytes())
                .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value}: {e}")))
        })
        .join()
        .map_err(|_| io::Error::other("sysctl thread panicked"))?
    }

    /// Reads a sysctl of this namespace (trailing newline removed).
    pub fn read_sysctl(&self, key: &str) -> io::Result<String> {
        let path = sysctl_path(key)?;
        self.enter(move || fs::read_to_string(&path).map(|s| s.trim_end().to_owned()))
            .join()
            .map_err(|_| io::Error::other("sysctl thread panicked"))?
    }

    /// Runs `ip netns exec NAME program args…` to completion and returns its output.
    ///
    /// The exit status is not checked: look at [`Output::status`].
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", self.name.as_str(), program])
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Like [`exec`](Self::exec), but a non-zero exit is an error that names the command and
    /// carries its stderr; returns stdout.
    pub fn exec_checked(&self, program: &str, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run_checked("ip", &full)
    }

    /// The MAC address of interface `ifname`.
    pub fn mac(&self, ifname: &str) -> io::Result<[u8; 6]> {
        let link = self.link_json(ifname, &["-j", "link", "show", "dev", ifname])?;
        let text = link["address"]
            .as_str()
            .ok_or_else(|| io::Error::other(format!("no MAC address for {ifname}: {link}")))?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != mac.len() {
            return Err(io::Error::other(format!(
                "{ifname}: odd MAC address {text}"
            )));
        }
        for (byte, part) in mac.iter_mut().zip(parts) {
            *byte = u8::from_str_radix(part, 16).map_err(io::Error::other)?;
        }
        Ok(mac)
    }

    /// Packets received so far on interface `ifname` (its 64-bit counter).
    pub fn rx_packets(&self, ifname: &str) -> io::Result<u64> {
        let link = self.link_json(ifname, &["-j", "-s", "link", "show", "dev", ifname])?;
        link["stats64"]["rx"]["packets"]
            .as_u64()
            .ok_or_else(|| io::Error::other(format!("no rx counter for {ifname}: {link}")))
    }

    /// The one link `ip -j ... link show dev ifname` describes.
    fn link_json(&self, ifname: &str, args: &[&str]) -> io::Result<serde_json::Value> {
        let out = self.ip(args)?;
        let mut all: serde_json::Value = serde_json::from_str(&out).map_err(io::Error::other)?;
        match all.get_mut(0) {
            Some(link) => Ok(link.take()),
            None => Err(io::Error::other(format!("no link {ifname}: {out}"))),
        }
    }

    /// Runs `f` on a new thread that has first joined this namespace (`setns(CLONE_NEWNET)`):
    /// sockets `f` opens live in the namespace. Only that thread changes namespace.
    ///
    /// If joining fails the thread panics before `f` runs (so `f` never runs in the wrong
    /// namespace) and [`JoinHandle::join`] returns the error.
    pub fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let name = self.name.clone();
        thread::spawn(move || {
            if let Err(e) = enter_netns(&name) {
                panic!("cannot enter network namespace {name}: {e}");
            }
            f()
        })
    }
}

/// Joins the calling thread to the named namespace.
fn enter_netns(name: &str) -> io::Result<()> {
    let file = File::open(Path::new(NETNS_RUN_DIR).join(name))?;
    // SAFETY: `file` is an open descriptor for the whole call; setns only reads it and
    // changes the network namespace of the calling thread, which is ours.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`, refusing odd keys.
fn sysctl_path(key: &str) -> io::Result<PathBuf> {
    let ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !key.split('.').any(str::is_empty);
    if !ok {
        return Err(invalid(format!("bad sysctl key {key:?}")));
    }
    Ok(Path::new("/proc/sys").join(key.replace('.', "/")))
}

/// Transmit and receive queues of every veth the lab creates: one per core of a 2-core
/// machine, so that a mux on AF_XDP (one socket per receive queue) can run two workers. A veth
/// delivers a packet on the peer's receive queue of the index the sender transmitted on, and
/// the kernel spreads forwarded flows over transmit queues by hash.
pub const VETH_QUEUES: u32 = 2;

/// One end of a veth pair for [`Lab::veth`]: the namespace, the interface name (at most 15
/// bytes) and optionally an address with prefix length, e.g. `"198.18.1.2/24"`.
#[derive(Clone, Copy, Debug)]
pub struct VethEnd<'a> {
    /// The namespace this end lives in.
    pub ns: &'a Namespace,
    /// The interface name inside that namespace.
    pub ifname: &'a str,
    /// The address to add (`ADDR/LEN`), if any.
    pub cidr: Option<&'a str>,
}

impl<'a> VethEnd<'a> {
    /// An end with an address.
    pub fn new(ns: &'a Namespace, ifname: &'a str, cidr: &'a str) -> Self {
        Self {
            ns,
            ifname,
            cidr: Some(cidr),
        }
    }
}

/// Owns network namespaces and the processes spawned in them; removes both when dropped.
///
/// See the [module documentation](self) for the naming scheme and the cleanup guarantees.
#[derive(Debug)]
pub struct Lab {
    /// `lbt-{tag}-{pid}-{seq}`: every namespace name starts with it, plus `-{short}`.
    prefix: String,
    /// Per-lab directory for process logs.
    dir: PathBuf,
    /// Names of the namespaces created, in creation order.
    namespaces: Vec<String>,
    /// Spawned processes not reaped yet.
    children: BTreeMap<u32, Child>,
    /// Spawned processes already reaped.
    exited: BTreeMap<u32, ExitStatus>,
    /// Every spawned process's log file.
    logs: BTreeMap<u32, PathBuf>,
    /// Processes of a re-attached lab (not our children): pid → start time (`/proc/PID/stat`
    /// field 22), so that a reused pid is never signalled.
    adopted: BTreeMap<u32, u64>,
    /// A persistent lab's processes get their own process group (no terminal signals).
    persistent: bool,
    /// Detached: dropping this value leaves everything running ([`Lab::detach`]).
    detached: bool,
}

/// What `lb lab down` needs to remove a lab that an earlier process left running: written by
/// [`Lab::detach`], read by [`Lab::reattach`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LabRecord {
    /// The prefix of every namespace name.
    pub prefix: String,
    /// The lab's directory (logs, configs, sockets).
    pub dir: PathBuf,
    /// The namespaces it created.
    pub namespaces: Vec<String>,
    /// The processes it spawned and that were running: (pid, start time, log file).
    pub processes: Vec<(u32, u64, PathBuf)>,
}

/// The file in a persistent lab's directory that records it while it is built.
pub const JOURNAL: &str = "journal.json";

/// Writes `bytes` to `path` through a temporary file and a rename: a reader sees the old file
/// or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// The start time of process `pid` (clock ticks since boot, `/proc/PID/stat` field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(19)?.parse().ok()
}

impl Lab {
    /// Starts a lab whose namespaces are named `lbt-{tag}-{pid}-{seq}-{short}`, with its files
    /// in `{temp}/lbt-{tag}-{pid}-{seq}`.
    ///
    /// `tag` is ASCII letters and digits only (it identifies the user, e.g. a test file). First
    /// removes stale namespaces `lbt-{tag}-*` whose creating pid is no longer alive, killing the
    /// processes still inside them, and the stale directories of the same kind.
    pub fn new(tag: &str) -> io::Result<Lab> {
        check_word("tag", tag)?;
        cleanup_stale(tag);
        let pid = std::process::id();
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("lbt-{tag}-{pid}-{seq}");
        let dir = std::env::temp_dir().join(&prefix);
        // A directory left by an earlier process that had the same pid holds nothing of ours.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        temporary_labs().insert(prefix.clone(), dir.clone());
        Ok(Lab {
            prefix,
            dir,
            namespaces: Vec::new(),
            children: BTreeMap::new(),
            exited: BTreeMap::new(),
            logs: BTreeMap::new(),
            adopted: BTreeMap::new(),
            persistent: false,
            detached: false,
        })
    }

    /// A lab meant to outlive this process (`lb lab up`): namespaces `lbl-{name}-{short}`,
    /// files in `dir` (created; emptied if it exists). Its processes run in their own process
    /// group, so a terminal's Ctrl-C does not reach them. Fails if a namespace with that prefix
    /// exists: it would be another lab's.
    pub fn persistent(name: &str, dir: &Path) -> io::Result<Lab> {
        check_word("lab name", name)?;
        let prefix = format!("lbl-{name}");
        if let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{prefix}-"))
                {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "namespace {} exists, and lab {name} has no record of it: another tool's, or left by a crash (look inside, then `ip netns del` it)",
                            e.file_name().to_string_lossy()
                        ),
                    ));
                }
            }
        }
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        Ok(Lab {
            prefix,
            dir: dir.to_owned(),
            namespaces: Vec::new(),
            children: BTreeMap::new(),
            exited: BTreeMap::new(),
            logs: BTreeMap::new(),
            adopted: BTreeMap::new(),
            persistent: true,
            detached: false,
        })
    }

    /// Leaves the namespaces and the running processes in place and returns what
    /// [`Lab::reattach`] needs to remove them later. Dropping the lab afterwards does nothing.
    pub fn detach(mut self) -> LabRecord {
        self.write_journal();
        self.detached = true;
        self.record()
    }

    /// A handle on a lab an earlier process detached, to look at it only: dropping it leaves
    /// everything running (`lb lab status`).
    pub fn view(record: LabRecord) -> io::Result<Lab> {
        let mut lab = Lab::reattach(record)?;
        lab.detached = true;
        Ok(lab)
    }

    /// Takes back a lab an earlier process detached: its namespaces and processes are this
    /// lab's again, and dropping it stops the processes (SIGTERM, then SIGKILL) and removes
    /// the namespaces and the directory. Only names with the `lbl-` prefix are accepted, and a
    /// process is signalled only while its start time is the recorded one.
    pub fn reattach(record: LabRecord) -> io::Result<Lab> {
        let lab_word = record.prefix.strip_prefix("lbl-").unwrap_or("");
        check_word("lab name", lab_word)?;
        for ns in &record.namespaces {
            if !ns.starts_with(&format!("{}-", record.prefix)) {
                return Err(invalid(format!(
                    "namespace {ns} is not lab {}'s: refusing to touch it",
                    record.prefix
                )));
            }
        }
        let mut logs = BTreeMap::new();
        let mut adopted = BTreeMap::new();
        for (pid, started, log) in record.processes {
            adopted.insert(pid, started);
            logs.insert(pid, log);
        }
        Ok(Lab {
            prefix: record.prefix,
            dir: record.dir,
            namespaces: record
                .namespaces
                .into_iter()
                .filter(|n| Path::new(NETNS_RUN_DIR).join(n).exists())
                .collect(),
            children: BTreeMap::new(),
            exited: BTreeMap::new(),
            logs,
            adopted,
            persistent: true,
            detached: false,
        })
    }

    /// Handles to this lab's namespaces, by short name (`{prefix}-{short}`).
    pub fn existing_namespace(&self, short: &str) -> Option<Namespace> {
        let name = format!("{}-{short}", self.prefix);
        self.namespaces
            .contains(&name)
            .then_some(Namespace { name })
    }

    /// Whether `pid` is one of this lab's processes and still running.
    pub fn running(&mut self, pid: u32) -> bool {
        if let Some(child) = self.children.get_mut(&pid) {
            return matches!(child.try_wait(), Ok(None));
        }
        self.adopted
            .get(&pid)
            .is_some_and(|&started| start_time(pid) == Some(started))
    }

    /// The prefix of every namespace name of this lab (`lbt-{tag}-{pid}-{seq}`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The directory holding the logs of spawned processes (removed on drop, kept when the
    /// lab is dropped during a panic).
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// The names of all namespaces this lab has created.
    pub fn namespace_names(&self) -> &[String] {
        &self.namespaces
    }

    /// Creates namespace `{prefix}-{short}` (`short`: ASCII letters and digits): loopback up,
    /// `rp_filter` 0 (`all` and `default`), `ip_forward` 0.
    pub fn namespace(&mut self, short: &str) -> io::Result<Namespace> {
        check_word("namespace short name", short)?;
        let name = format!("{}-{short}", self.prefix);
        {
            let _creating = self.creation_lock();
            run_checked("ip", &["netns", "add", &name])?;
        }
        // Recorded before configuring, so that drop deletes it even if configuring fails.
        self.namespaces.push(name.clone());
        self.write_journal();
        let ns = Namespace { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        ns.sysctl("net.ipv4.ip_forward", "0")?;
        Ok(ns)
    }

    /// Creates a veth pair with one end in each namespace (both of this lab), with
    /// [`VETH_QUEUES`] queues each way, sets `mtu` on
    /// both, adds the addresses and brings both ends up.
    ///
    /// The pair is created by `ip -n A link add … peer name … netns B`, i.e. from inside
    /// namespace A directly into A and B: nothing ever appears in the root namespace.
    pub fn veth(&self, a: VethEnd<'_>, b: VethEnd<'_>, mtu: u32) -> io::Result<()> {
        for end in [&a, &b] {
            self.check_own(end.ns)?;
            if end.ifname.is_empty() || end.ifname.len() > 15 || end.ifname.contains('/') {
                return Err(invalid(format!("bad interface name {:?}", end.ifname)));
            }
        }
        let mtu = mtu.to_string();
        let queues = VETH_QUEUES.to_string();
        a.ns.ip(&[
            "link",
            "add",
            a.ifname,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            b.ifname,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "netns",
            b.ns.name(),
            "mtu",
            &mtu,
        ])?;
        for end in [&a, &b] {
            if let Some(cidr) = end.cidr {
                end.ns.ip(&["addr", "add", cidr, "dev", end.ifname])?;
            }
            end.ns.ip(&["link", "set", end.ifname, "up"])?;
        }
        Ok(())
    }

    /// Starts `cmd` inside `ns` (through `ip netns exec`, which execs in place, so the pid
    /// returned is the program's own) and returns its pid.
    ///
    /// Taken from `cmd`: program, arguments, environment changes, working directory. Its stdio
    /// settings are replaced: stdin is `/dev/null`, stdout and stderr go to a log file in
    /// [`log_dir`](Self::log_dir), readable with [`log`](Self::log). The file is named for the
    /// node and the process: `{namespace short name}-{program}[-{subcommand}].log`, e.g.
    /// `mux1-lb-mux.log`, `mux1-lb-healthcheck.log`, `be1-lb-agent.log`, `router-bird.log`; a
    /// process started again gets `-2`, `-3`, … before `.log`.
    pub fn spawn(&mut self, ns: &Namespace, cmd: &mut Command) -> io::Result<u32> {
        self.check_own(ns)?;
        let log_path = self.free_log_path(&log_name(ns, cmd));
        let log = File::create(&log_path)?;
        let mut wrapped = Command::new("ip");
        wrapped
            .args([
                OsStr::new("netns"),
                OsStr::new("exec"),
                OsStr::new(&ns.name),
            ])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.persistent {
            std::os::unix::process::CommandExt::process_group(&mut wrapped, 0);
        }
        let child = {
            let _creating = self.creation_lock();
            wrapped.spawn()?
        };
        let pid = child.id();
        self.children.insert(pid, child);
        self.logs.insert(pid, log_path);
        self.write_journal();
        Ok(pid)
    }

    /// A temporary lab creates namespaces and starts processes under this lock, so that
    /// [`remove_labs_on_signal`]'s handler sees everything it made (a persistent lab's own
    /// journal does that job: `None`).
    fn creation_lock(&self) -> Option<MutexGuard<'static, BTreeMap<String, PathBuf>>> {
        (!self.persistent).then(temporary_labs)
    }

    /// `{dir}/{name}.log`, or `{name}-2.log`, `-3`, … if this lab already logs to that one.
    fn free_log_path(&self, name: &str) -> PathBuf {
        let taken = |p: &PathBuf| self.logs.values().any(|l| l == p);
        let mut path = self.dir.join(format!("{name}.log"));
        let mut n = 1;
        while taken(&path) {
            n += 1;
            path = self.dir.join(format!("{name}-{n}.log"));
        }
        path
    }

    /// The record of what this lab has made so far: namespaces, and the processes still
    /// running with their start times.
    fn record(&mut self) -> LabRecord {
        let mut processes = Vec::new();
        for (&pid, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None))
                && let Some(started) = start_time(pid)
            {
                processes.push((
                    pid,
                    started,
                    self.logs.get(&pid).cloned().unwrap_or_default(),
                ));
            }
        }
        for (&pid, &started) in &self.adopted {
            if start_time(pid) == Some(started) {
                processes.push((
                    pid,
                    started,
                    self.logs.get(&pid).cloned().unwrap_or_default(),
                ));
            }
        }
        LabRecord {
            prefix: self.prefix.clone(),
            dir: self.dir.clone(),
            namespaces: self.namespaces.clone(),
            processes,
        }
    }

    /// A persistent lab keeps [`JOURNAL`] in its directory up to date as it grows, so that a
    /// build interrupted by a signal can still be removed ([`Lab::journal`]).
    fn write_journal(&mut self) {
        if !self.persistent || self.detached {
            return;
        }
        let record = self.record();
        let path = self.dir.join(JOURNAL);
        let written = serde_json::to_vec(&record)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomically(&path, &bytes));
        if let Err(e) = written {
            eprintln!("lb::netns: cannot write {}: {e}", path.display());
        }
    }

    /// The journal a persistent lab in `dir` left (see [`Lab::persistent`]), if any.
    pub fn journal(dir: &Path) -> io::Result<Option<LabRecord>> {
        match fs::read(dir.join(JOURNAL)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| invalid(format!("{}: {e}", dir.join(JOURNAL).display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The output (stdout and stderr, interleaved) of spawned process `pid` so far.
    pub fn log(&self, pid: u32) -> String {
        match self.logs.get(&pid) {
            Some(path) => match fs::read(path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) => format!("(cannot read log {}: {e})", path.display()),
            },
            None => format!("(pid {pid} was not spawned by this lab)"),
        }
    }

    /// Sends signal `sig` to `pid`, which must be a process this lab spawned and has not
    /// reaped yet (an unreaped pid cannot have been reused).
    pub fn signal(&self, pid: u32, sig: i32) -> io::Result<()> {
        if !self.children.contains_key(&pid) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("pid {pid} is not a running process spawned by this lab"),
            ));
        }
        let pid = libc::pid_t::try_from(pid).map_err(|_| invalid("pid out of range"))?;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
        if unsafe { libc::kill(pid, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Waits up to `timeout` for spawned process `pid` to exit and returns its status (also
    /// for a process that exited earlier). `None`: still running, or not spawned by this lab.
    pub fn wait(&mut self, pid: u32, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited.get(&pid) {
            return Some(*status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.children.get_mut(&pid)?;
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.children.remove(&pid);
                    self.exited.insert(pid, status);
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Errors unless `ns` is one of this lab's namespaces.
    fn check_own(&self, ns: &Namespace) -> io::Result<()> {
        if self.namespaces.contains(&ns.name) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "namespace {} does not belong to lab {}",
                    ns.name, self.prefix
                ),
            ))
        }
    }

    /// SIGTERM to every adopted process still running (same start time), up to [`TERM_GRACE`]
    /// to exit; what is left is killed with the rest of the namespace's processes.
    fn stop_adopted(&mut self) {
        let alive = |pid: u32, started: u64| start_time(pid) == Some(started);
        for (&pid, &started) in &self.adopted {
            if alive(pid, started)
                && let Ok(pid) = libc::pid_t::try_from(pid)
            {
                // SAFETY: kill has no memory-safety preconditions; the start time check makes
                // a reused pid very unlikely (and every pid here ran inside our namespaces).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        while self.adopted.iter().any(|(&p, &s)| alive(p, s)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.adopted.clear();
    }

    /// SIGTERM to every unreaped child, up to [`TERM_GRACE`] to exit, then SIGKILL; reaps all.
    fn stop_children(&mut self) {
        for (&pid, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None))
                && let Ok(pid) = libc::pid_t::try_from(pid)
            {
                // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        loop {
            let mut running = 0;
            for (&pid, child) in &mut self.children {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        self.exited.insert(pid, status);
                    }
                    _ => running += 1,
                }
            }
            self.children
                .retain(|pid, _| !self.exited.contains_key(pid));
            if running == 0 || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for (pid, mut child) in std::mem::take(&mut self.children) {
            let _ = child.kill();
            let status = child
                .wait()
                .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
            self.exited.insert(pid, status);
        }
    }
}

impl Drop for Lab {
    /// Stops the spawned processes, kills whatever else is left inside the lab's namespaces,
    /// deletes the namespaces and the log directory. Never panics; problems go to stderr.
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.stop_children();
        self.stop_adopted();
        for name in &self.namespaces {
            kill_inside(name);
            if let Err(e) = run_checked("ip", &["netns", "del", name]) {
                eprintln!("lb::netns: cannot delete namespace {name}: {e}");
            }
        }
        if thread::panicking() {
            eprintln!("lb::netns: lab logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        if !self.persistent {
            temporary_labs().remove(&self.prefix);
        }
    }
}

/// A spawned process's log name (see [`Lab::spawn`]): the namespace's short name, the
/// program's file name, and the leading arguments that are plain words (a subcommand: `mux`,
/// `lab serve`; at most two), joined by `-`.
fn log_name(ns: &Namespace, cmd: &Command) -> String {
    let mut parts = vec![
        ns.name.rsplit('-').next().unwrap_or("ns").to_owned(),
        Path::new(cmd.get_program())
            .file_name()
            .unwrap_or(OsStr::new("cmd"))
            .to_string_lossy()
            .into_owned(),
    ];
    parts.extend(
        cmd.get_args()
            .map_while(|a| {
                let a = a.to_str()?;
                let word = !a.is_empty()
                    && !a.starts_with('-')
                    && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                word.then(|| a.to_owned())
            })
            .take(2),
    );
    parts.join("-")
}

/// Whether `name` is `lbt-{tag}-{pid}-…` with a `pid` that is no longer alive.
fn is_stale(name: &str, tag: &str) -> bool {
    let Some(rest) = name.strip_prefix(&format!("lbt-{tag}-")) else {
        return false;
    };
    let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    // A live pid: its lab may still be running.
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the directories `{temp}/lbt-{tag}-{pid}-…` whose pid is gone (a run killed before
/// its lab was dropped, or the logs a panicking run kept).
fn remove_stale_dirs(tag: &str) {
    let temp = std::env::temp_dir();
    let Ok(entries) = fs::read_dir(&temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_stale(&name, tag)
            && entry.file_type().is_ok_and(|t| t.is_dir())
            && let Err(e) = fs::remove_dir_all(entry.path())
        {
            eprintln!("lb::netns: cannot remove stale directory {name}: {e}");
        }
    }
}

/// Removes namespaces `lbt-{tag}-{pid}-…` whose pid is gone, killing the processes inside,
/// and the stale directories of the same kind.
fn cleanup_stale(tag: &str) {
    remove_stale_dirs(tag);
    let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_stale(&name, tag) {
            continue;
        }
        kill_inside(&name);
        if let Err(e) = run_checked("ip", &["netns", "del", &name]) {
            eprintln!("lb::netns: cannot delete stale namespace {name}: {e}");
        }
    }
}

/// The (device, inode) identity of a network namespace file.
fn ns_identity(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Pids of processes (other than this one) whose network namespace is `id`.
fn pids_inside(id: (u64, u64)) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| ns_identity(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(id))
        .collect()
}

/// SIGKILLs every process inside namespace `name` (not this process) and waits up to 2 s for
/// them to be gone. Race-free against pid reuse: the process is pinned with a pidfd and its
/// namespace checked again before the signal goes through that pidfd.
fn kill_inside(name: &str) {
    let Some(id) = ns_identity(&Path::new(NETNS_RUN_DIR).join(name)) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = pids_inside(id);
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("lb::netns: processes {pids:?} still inside {name}");
            return;
        }
        for pid in pids {
            kill_pinned(pid, id);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs `pid` if, once pinned by a pidfd, it is still inside namespace `id`.
fn kill_pinned(pid: i32, id: (u64, u64)) {
    signal_pinned(pid, libc::SIGKILL, || {
        ns_identity(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(id)
    });
}

/// Sends `sig` to `pid` if, once pinned by a pidfd, `still_ours` holds: the check then
/// speaks of the process the signal reaches, even if the pid was reused before the pinning.
fn signal_pinned(pid: i32, sig: i32, still_ours: impl FnOnce() -> bool) {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return;
    }
    if still_ours() {
        // SAFETY: `fd` is the pidfd opened above; a null siginfo is allowed; flags are 0.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    // SAFETY: `fd` was opened above, is owned here and closed exactly once.
    unsafe { libc::close(fd) };
}

/// Runs `program args…`; a non-zero exit is an error naming the command and its stderr.
fn run_checked(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("`{program}`: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Errors unless `value` is non-empty ASCII letters and digits.
fn check_word(what: &str, value: &str) -> io::Result<()> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {value:?} must be ASCII letters and digits"
        )))
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_map_to_proc_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.conf.all.rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/all/rp_filter")
        );
        for bad in ["", "net..x", "net/ipv4", "../x", "net.ipv4.", "a b"] {
            assert!(sysctl_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stale_directories_of_the_tag_whose_pid_is_gone_are_removed() {
        let mut gone = Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        assert!(!Path::new(&format!("/proc/{dead}")).exists());
        let temp = std::env::temp_dir();
        let stale = temp.join(format!("lbt-stalet-{dead}-0"));
        let live = temp.join(format!("lbt-stalet-{}-99", std::process::id()));
        let other_tag = temp.join(format!("lbt-staleu-{dead}-0"));
        for dir in [&stale, &live, &other_tag] {
            fs::create_dir_all(dir.join("sub")).unwrap();
            fs::write(dir.join("sub/mux1-lb-mux.log"), "x").unwrap();
        }
        remove_stale_dirs("stalet");
        let (stale_left, live_left, other_left) =
            (stale.exists(), live.exists(), other_tag.exists());
        let _ = fs::remove_dir_all(&live);
        let _ = fs::remove_dir_all(&other_tag);
        let _ = fs::remove_dir_all(&stale);
        assert!(!stale_left, "a dead run's directory is removed");
        assert!(live_left, "a live run's directory is kept");
        assert!(other_left, "another tag's directory is kept");
    }

    #[test]
    fn log_names_say_the_node_and_the_process() {
        let ns = Namespace {
            name: "lbt-demo-12-0-mux1".to_owned(),
        };
        let name = |program: &str, args: &[&str]| {
            let mut cmd = Command::new(program);
            cmd.args(args);
            log_name(&ns, &cmd)
        };
        assert_eq!(name("/x/lb", &["mux", "--config", "a.toml"]), "mux1-lb-mux");
        assert_eq!(
            name("lb", &["healthcheck", "--config", "a"]),
            "mux1-lb-healthcheck"
        );
        assert_eq!(
            name("lb", &["lab", "serve", "--name", "be1"]),
            "mux1-lb-lab-serve"
        );
        assert_eq!(name("bird", &["-f", "-c", "/tmp/x.conf"]), "mux1-bird");
        assert_eq!(name("sh", &["-c", "sleep 1"]), "mux1-sh");
        assert_eq!(name("sleep", &["../../etc"]), "mux1-sleep");
    }

    #[test]
    fn tags_and_short_names_are_plain_words() {
        assert!(check_word("tag", "nh1").is_ok());
        for bad in ["", "a-b", "a b", "a/b", "ä"] {
            assert!(check_word("tag", bad).is_err(), "{bad:?}");
        }
    }
}
