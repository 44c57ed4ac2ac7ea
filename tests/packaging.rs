//! The packaged documentation of the config format stays true: the example installed as
//! /etc/walship/example.toml.sample parses (as shipped and with every commented key enabled),
//! and walship.toml(5) and the example both mention every key the parser accepts.

use std::path::Path;

/// Every key `src/config.rs` accepts (top level, then `[[replica]]`).
const TOP_KEYS: &[&str] = &[
    "db",
    "state-dir",
    "snapshot-interval",
    "retention",
    "spool-limit",
    "segment-size",
    "compaction-fanout",
    "checkpoint-pages",
    "metrics-listen",
    "metrics-textfile",
    "shutdown-timeout",
];
const REPLICA_KEYS: &[&str] = &[
    "name",
    "url",
    "key-path",
    "passphrase-file",
    "known-hosts",
    "use-agent",
    "timeout",
    "endpoint",
    "region",
    "path-style",
    "credentials-file",
    "encrypt-to",
    "identity-file",
];

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn example_config_parses_as_shipped_and_fully_uncommented() {
    let text = read("packaging/etc/example.toml.sample");
    let s = walship::config::parse(&text, "example.toml.sample").expect("shipped example");
    assert_eq!(s.replicas.len(), 1);
    // Enable every commented `#key = value` line and `#[[replica]]` header.
    let full: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(r)
                if r.starts_with("[[")
                    || r.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                    }) =>
            {
                r
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let s = walship::config::parse(&full, "example (uncommented)").expect("uncommented example");
    assert_eq!(s.replicas.len(), 3, "{full}");
    for k in TOP_KEYS.iter().chain(REPLICA_KEYS) {
        assert!(
            full.lines().any(|l| l.starts_with(&format!("{k} = "))),
            "example.toml.sample lacks key {k}"
        );
    }
}

#[test]
fn man_page_documents_every_key() {
    let man = read("docs/walship.toml.5");
    for k in TOP_KEYS.iter().chain(REPLICA_KEYS) {
        // Keys are the tag of a `.TP` entry: `.BR key " = ..."`.
        let tag = format!(".BR {k} \"");
        assert!(man.contains(&tag), "walship.toml.5 does not document {k}");
    }
}

#[test]
fn key_lists_match_the_parser() {
    // The fields of the serde structs in src/config.rs, kebab-cased, are the accepted keys.
    let src = read("src/config.rs");
    let fields = |strukt: &str| -> Vec<String> {
        let start = src.find(&format!("struct {strukt} {{")).expect(strukt);
        let body = &src[start..start + src[start..].find("\n}").expect("end of struct")];
        body.lines()
            .skip(1)
            .filter_map(|l| l.trim().split_once(':').map(|(f, _)| f.trim().to_owned()))
            .filter(|f| !f.starts_with('#') && !f.starts_with("//"))
            .map(|f| f.replace('_', "-"))
            .collect()
    };
    let mut top = fields("RawConfig");
    top.retain(|k| k != "replica");
    assert_eq!(top, TOP_KEYS, "top-level keys changed in src/config.rs");
    assert_eq!(
        fields("RawReplica"),
        REPLICA_KEYS,
        "replica keys changed in src/config.rs"
    );
}
