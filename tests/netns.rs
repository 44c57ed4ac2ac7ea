//! A network namespace joined to the test's own namespace by a veth pair: ALPHA's side of a
//! link the tests can cut (`ip link set down`), blackhole (nft drop), make lossy (nft `numgen
//! random`) or slow (`tc tbf`). This kernel has no netem, so delay is not simulated.
//!
//! Invariants: only interfaces, addresses, nft tables and qdiscs this harness created are
//! touched (names carry the test binary's pid and a counter; the addresses are in
//! 10.213.0.0/16); all of it is removed on drop, also when a test panics.

#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with one veth link to this one; see the module docs.
pub struct Netns {
    /// The namespace's name (for `ip netns exec`).
    pub name: String,
    /// Address of the namespace's end of the link.
    pub ns_ip: String,
    host_if: String,
    table: String,
}

impl Netns {
    /// Creates the namespace and the link, both up.
    pub fn new() -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "network namespace tests must run as root"
        );
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = (std::process::id() as usize * 7 + n) % 60000;
        let subnet = (id % 250, (id / 250) % 64 * 4);
        let ns = Netns {
            name: format!("walship-alpha-{id}"),
            ns_ip: format!("10.213.{}.{}", subnet.0, subnet.1 + 2),
            host_if: format!("wsh{id}"),
            table: format!("walship_test_{id}"),
        };
        let host_ip = format!("10.213.{}.{}/30", subnet.0, subnet.1 + 1);
        let peer = format!("wsn{id}");
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &ns.host_if])
            .output();
        sh(&["ip", "netns", "add", &ns.name]);
        sh(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        sh(&["ip", "link", "set", &peer, "netns", &ns.name]);
        sh(&["ip", "addr", "add", &host_ip, "dev", &ns.host_if]);
        sh(&["ip", "link", "set", &ns.host_if, "up"]);
        let inside = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &ns.name];
            v.extend_from_slice(a);
            sh(&v);
        };
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &peer,
        ]);
        inside(&["ip", "link", "set", &peer, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Brings the link up or down (from this side).
    pub fn link(&self, up: bool) {
        sh(&[
            "ip",
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" },
        ]);
    }

    /// Drops `percent` % of packets both ways (100: a silent blackhole; 0: none).
    pub fn loss(&self, percent: u32) {
        self.clear_rules();
        if percent == 0 {
            return;
        }
        sh(&["nft", "add", "table", "inet", &self.table]);
        let cond = if percent >= 100 {
            String::new()
        } else {
            format!("numgen random mod 100 < {percent} ")
        };
        for (chain, hook, dir) in [("out", "output", "daddr"), ("in", "input", "saddr")] {
            sh(&[
                "nft",
                "add",
                "chain",
                "inet",
                &self.table,
                chain,
                &format!("{{ type filter hook {hook} priority 0; }}"),
            ]);
            let rule = format!(
                "add rule inet {} {chain} ip {dir} {} {cond}drop",
                self.table, self.ns_ip
            );
            let args: Vec<&str> = std::iter::once("nft")
                .chain(rule.split_whitespace())
                .collect();
            sh(&args);
        }
    }

    fn clear_rules(&self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }

    /// Limits the bandwidth towards the namespace (`tc tbf`), or removes the limit.
    pub fn rate(&self, rate: Option<&str>) {
        match rate {
            Some(r) => sh(&[
                "tc",
                "qdisc",
                "replace",
                "dev",
                &self.host_if,
                "root",
                "tbf",
                "rate",
                r,
                "burst",
                "64kbit",
                "latency",
                "400ms",
            ]),
            None => {
                let _ = Command::new("tc")
                    .args(["qdisc", "del", "dev", &self.host_if, "root"])
                    .output();
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.clear_rules();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
