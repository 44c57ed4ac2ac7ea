//! Conventions every command keeps, checked on the real binary: exit codes (64 for a command
//! line that cannot work, 78 only for a configuration file), quiet exit 141 when stdout's
//! reader is gone, the discoverability of the manuals (`--help`, walship(1)'s sections), the
//! runbook's commands against the real CLI, and the generator's refusal of a database under
//! /tmp.

use crate::util::{walship, Daemon, Sandbox, BIN};
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `walship ARGS` with stdout a pipe whose reading end is already closed (what
/// `walship ... | head -1` becomes once head exits) and returns (exit code, stderr).
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run walship");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_quiet_141(args: &[&str]) {
    let (code, stderr) = with_closed_stdout(args);
    assert_eq!(
        code,
        Some(141),
        "`walship {}` with stdout closed: exit code; stderr: {stderr}",
        args.join(" ")
    );
    assert!(
        stderr.is_empty(),
        "`walship {}` with stdout closed must print nothing on stderr, got: {stderr}",
        args.join(" ")
    );
}

#[test]
fn argument_errors_exit_64_and_config_file_errors_78() {
    let sb = Sandbox::new();
    let cfg = sb.path("bad.toml");
    fs::write(&cfg, "db = \"/x.db\"\nretention = 5\n").expect("config");
    let cfg = cfg.to_str().expect("utf-8");
    let bad_args: &[&[&str]] = &[
        // clap's own errors.
        &["frobnicate"],
        &["restore", "--no-such-flag"],
        // Missing or conflicting arguments found after clap (source.rs `Usage`).
        &["replicate"],
        &["replicate", "/srv/app.db"],
        &["restore"],
        &["verify"],
        &["list"],
        &["status"],
        // Malformed URLs and values given as arguments.
        &["replicate", "/srv/app.db", "ftp://nowhere/x"],
        &["list", "/not/a/url"],
        &["restore", "-o", "/tmp/x.db", "gopher://x/y"],
        &[
            "restore",
            "-o",
            "/tmp/x.db",
            "--timestamp",
            "yesterday",
            "file:///r",
        ],
        &[
            "restore",
            "-o",
            "/tmp/x.db",
            "--position",
            "nonsense",
            "file:///r",
        ],
        &["status", "--max-lag", "soon", "--state-dir", "/nonexistent"],
        &["trust", "ftp://alpha/db"],
        &["list", "s3://bucket/p", "--endpoint", "not a url"],
        // The generator run by hand without its output directory.
        &["systemd-generator"],
    ];
    let mut wrong = Vec::new();
    for args in bad_args {
        let o = walship(*args);
        o.one_error_line();
        if o.code() != 64 {
            wrong.push(format!("`{}` exited {}: {}", o.cmd, o.code(), o.stderr));
        }
    }
    assert!(
        wrong.is_empty(),
        "argument errors not 64:\n{}",
        wrong.join("\n")
    );

    // Errors in a configuration file stay 78, whatever the command.
    for args in [
        vec!["replicate", "--config", cfg],
        vec!["list", "--config", cfg],
        vec!["status", "--config", cfg],
        vec!["replicate", "--config", "/nonexistent/walship.toml"],
    ] {
        let o = walship(&args);
        o.one_error_line();
        assert_eq!(o.code(), 78, "`{}`: {}", o.cmd, o.stderr);
    }
}

#[test]
fn no_arguments_prints_usage_and_exits_64() {
    let o = walship(Vec::<&str>::new());
    assert_eq!(o.code(), 64, "stderr: {}", o.stderr);
    assert!(
        o.stderr.contains("Usage: walship") && o.stderr.contains("restore"),
        "the help goes to stderr: {:?}",
        o.stderr
    );
    assert!(o.stdout.is_empty(), "nothing on stdout: {:?}", o.stdout);
    // Asked-for help is a success, on stdout.
    let o = walship(["--help"]).assert_ok();
    assert!(o.stdout.contains("Usage: walship"));
}

#[test]
fn closed_stdout_exits_141_quietly() {
    // clap's help and version.
    assert_quiet_141(&["--help"]);
    assert_quiet_141(&["--version"]);
    assert_quiet_141(&["list", "--help"]);

    // A writer-based command (list) and a println!-based one (restore's message).
    let sb = Sandbox::new();
    sb.create_db();
    let mut d = Daemon::start(
        &[sb.db().into_os_string(), sb.replica_url().into()],
        &sb.state(),
    );
    d.wait_caught_up(Duration::from_secs(30));
    d.stop();
    let url = sb.replica_url();
    assert_quiet_141(&["list", &url]);
    let out = sb.path("data/restored.db");
    let out = out.to_str().expect("utf-8");
    fs::write(out, b"").expect("existing output");
    assert_quiet_141(&["restore", "--if-db-not-exists", "-o", out, &url]);

    // status keeps its health code (3: the daemon is not running), which a monitoring
    // pipeline (`walship status | head -1`) wants more than 141; quietly too.
    let state = sb.state();
    let (code, stderr) = with_closed_stdout(&[
        "status",
        "--json",
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        (code, stderr.as_str()),
        (Some(3), ""),
        "status --json, stdout closed"
    );

    // Through a real shell pipeline as well: no panic, no "Broken pipe" line.
    let o = Command::new("sh")
        .arg("-c")
        .arg(
            "for i in 1 2 3 4 5 6 7 8; do \"$0\" list \"$1\"; done | head -c1 >/dev/null; \
             \"$0\" --help | (exec 0<&-; sleep 0.1)",
        )
        .arg(BIN)
        .arg(&url)
        .output()
        .expect("sh");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("walship:"),
        "pipeline stderr: {err}"
    );
}

/// The drop-in the generator writes for a database under `base` (/tmp or /var/tmp), with its
/// warnings; the config and output directories are elsewhere.
fn generate_for_db_under(base: &str, replica_under_tmp: bool) -> (String, Vec<String>, String) {
    let tmp = tempfile::tempdir_in(base).expect("tempdir under /tmp");
    let elsewhere = crate::generator::tempdir_outside_tmp();
    let (etc, out) = (elsewhere.path().join("etc"), elsewhere.path().join("out"));
    fs::create_dir_all(&etc).expect("mkdir");
    let data = if replica_under_tmp {
        elsewhere.path().join("data")
    } else {
        tmp.path().join("data")
    };
    fs::create_dir_all(&data).expect("mkdir");
    let db = data.join("app.db");
    crate::util::create_table(&db);
    let replica = if replica_under_tmp {
        tmp.path().join("replica")
    } else {
        elsewhere.path().join("replica")
    };
    fs::write(
        etc.join("app.toml"),
        format!(
            "db = \"{}\"\n[[replica]]\nurl = \"file://{}\"\n",
            db.display(),
            replica.display()
        ),
    )
    .expect("config");
    let warnings = walship::generator::generate(&etc, &out).expect("generate");
    let text = fs::read_to_string(
        out.join("walship@app.service.d")
            .join(walship::generator::DROP_IN_NAME),
    )
    .expect("a drop-in is written");
    let culprit = if replica_under_tmp { replica } else { db };
    (text, warnings, culprit.display().to_string())
}

#[test]
fn generator_makes_a_unit_with_files_under_tmp_fail_clearly() {
    for (base, replica_under_tmp) in [("/tmp", false), ("/var/tmp", false), ("/tmp", true)] {
        let (text, warnings, culprit) = generate_for_db_under(base, replica_under_tmp);
        let what = format!("{culprit} under {base}");
        assert_eq!(warnings.len(), 1, "{what}: one warning: {warnings:?}");
        let w = &warnings[0];
        assert!(
            w.starts_with("walship@app.service: the unit will exit 78: ")
                && w.contains(&culprit)
                && w.contains("PrivateTmp=yes"),
            "{what}: warning {w:?}"
        );
        // No sandbox opening, no identity: the unit only fails, saying why.
        assert!(
            !text.contains("ReadWritePaths") && !text.contains("User="),
            "{what}: {text}"
        );
        let exec: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect();
        assert_eq!(exec.len(), 2, "{what}: ExecStart= reset, then one: {text}");
        assert_eq!(exec[0], "ExecStart=");
        // Run that command line as systemd would: `/bin/sh -c "SCRIPT"`.
        let script = exec[1]
            .strip_prefix("ExecStart=/bin/sh -c \"")
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{what}: unexpected {}", exec[1]))
            .replace("$$", "$")
            .replace("%%", "%");
        let o = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("sh");
        let said = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{what}: {said}");
        assert!(
            said.starts_with("walship: walship@app.service: ") && said.contains(&culprit),
            "{what}: the journal line: {said}"
        );

        // systemd accepts the unit with that drop-in without a word.
        let root = crate::systemd_files::analyze_root(Some(&text));
        fs::create_dir_all(root.path().join("bin")).expect("mkdir");
        fs::copy("/bin/sh", root.path().join("bin/sh")).expect("stand-in sh");
        crate::systemd_files::verify(root.path());
    }
}

#[test]
fn help_says_where_the_manuals_are_and_walship_1_has_its_sections() {
    let help = walship(["--help"]).assert_ok().stdout;
    for want in [
        "man walship",
        "walship-COMMAND(1)",
        "walship.toml(5)",
        "completions",
        "walship generate-docs DIR",
        "64 bad arguments",
        "78 configuration error",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    walship(["generate-docs".as_ref(), dir.path().as_os_str()]).assert_ok();
    let page = fs::read_to_string(dir.path().join("man/walship.1")).expect("walship.1");
    let sections: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix(".SH "))
        .map(|s| s.trim_matches('"'))
        .collect();
    for want in ["EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"] {
        assert!(sections.contains(&want), "no {want} in {sections:?}");
    }
    let section = |name: &str| -> String {
        page.split(".SH ")
            .find(|s| s.trim_start_matches('"').starts_with(name))
            .unwrap_or_default()
            .replace("\\-", "-")
    };
    let exit = section("EXIT STATUS");
    for code in ["0", "1", "3, 4, 5, 6", "64", "69", "75", "78", "141"] {
        assert!(
            exit.contains(&format!(".B {code}\n")),
            "exit status {code} missing:\n{exit}"
        );
    }
    let env = section("ENVIRONMENT");
    for var in [
        "WALSHIP_CONFIG_DIR",
        "RUST_LOG",
        "STATE_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "SSL_CERT_FILE",
    ] {
        assert!(env.contains(var), "{var} missing:\n{env}");
    }
    let files = section("FILES");
    for f in [
        "/etc/walship/NAME.toml",
        "/etc/walship/known_hosts",
        "/var/lib/walship/NAME",
        "replicator.key",
    ] {
        assert!(files.contains(f), "{f} missing:\n{files}");
    }
    assert!(section("SEE ALSO").contains("walship.toml\\fR(5)"));
    // Every variable the code reads (`env::var("NAME")`, `env::var_os("NAME")`) is documented.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut read = Vec::new();
    for file in crate::util::walk(&src) {
        let text = fs::read_to_string(src.join(&file)).expect("read source");
        for piece in text.split("env::var").skip(1) {
            let piece = piece.strip_prefix("_os").unwrap_or(piece);
            let Some(rest) = piece.strip_prefix("(\"") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            read.push((name, file.display().to_string()));
        }
    }
    assert!(read.len() >= 8, "the scan finds the variables: {read:?}");
    let undocumented: Vec<_> = read
        .iter()
        .filter(|(name, _)| {
            !name.starts_with("WALSHIP_FAILPOINT")
                && name != "WALSHIP_FUZZ_CASES"
                && !env.contains(name.as_str())
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in walship(1): {undocumented:?}"
    );
}

/// Splits one shell command line into words (single and double quotes, no expansions) and
/// simple commands (`&&`, `||`, `;`, `|`), dropping a trailing `# comment`.
fn shell_commands(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let mut word: Option<String> = None;
    let mut chars = line.chars().peekable();
    let mut quote = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_with(String::new).push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_with(String::new);
            }
            (None, '#') if word.is_none() => break,
            (None, ' ' | '\t') => {
                if let Some(w) = word.take() {
                    commands.last_mut().expect("one").push(w);
                }
            }
            (None, '&' | '|' | ';') => {
                if let Some(w) = word.take() {
                    commands.last_mut().expect("one").push(w);
                }
                if matches!(chars.peek(), Some('&' | '|')) {
                    chars.next();
                }
                commands.push(Vec::new());
            }
            (None, c) => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        commands.last_mut().expect("one").push(w);
    }
    commands.retain(|c| !c.is_empty());
    commands
}

/// Every `walship ...` command in `text`: lines of fenced ```sh blocks and inline code spans.
fn walship_commands(text: &str) -> Vec<Vec<String>> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            in_sh = !in_sh && matches!(fence.trim(), "sh" | "bash" | "console");
            continue;
        }
        if in_sh {
            lines.push(line.to_owned());
        } else {
            lines.extend(
                line.split('`')
                    .skip(1)
                    .step_by(2)
                    .filter(|s| s.starts_with("walship "))
                    .map(str::to_owned),
            );
        }
    }
    lines
        .iter()
        .flat_map(|l| shell_commands(l))
        .filter(|c| c[0] == "walship")
        .collect()
}

/// What is wrong with `walship ARGS` according to the real binary's `--help` texts: an
/// unknown subcommand, or an option its `--help` does not list.
fn check_against_help(cmd: &[String], help_of: &mut impl FnMut(&str) -> String) -> Vec<String> {
    let top = help_of("");
    let subcommands: Vec<&str> = top
        .split("Commands:\n")
        .nth(1)
        .unwrap_or("")
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let line = cmd.join(" ");
    let Some(sub) = cmd[1..].iter().find(|w| !w.starts_with('-')) else {
        return vec![format!("`{line}`: no subcommand")];
    };
    if !subcommands.contains(&sub.as_str()) {
        return vec![format!(
            "`{line}`: no subcommand {sub:?} in {subcommands:?}"
        )];
    }
    let help = format!("{}\n{top}", help_of(sub));
    let listed = |flag: &str| {
        help.match_indices(flag).any(|(i, _)| {
            let before = help[..i].chars().next_back();
            let after = help[i + flag.len()..].chars().next();
            matches!(before, Some(' ' | '\n' | '['))
                && matches!(after, Some(' ' | ',' | '=' | '\n' | '.' | '<'))
        })
    };
    cmd[1..]
        .iter()
        .filter(|w| w.starts_with('-') && w.len() > 1)
        .map(|w| w.split('=').next().unwrap_or(w))
        .filter(|flag| !listed(flag))
        .map(|flag| format!("`{line}`: walship {sub} --help lists no {flag}"))
        .collect()
}

#[test]
fn runbook_commands_exist_in_the_real_cli() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let runbook = fs::read_to_string(root.join("docs/RUNBOOK.md")).expect("docs/RUNBOOK.md");
    let readme = fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(
        readme.contains("(docs/RUNBOOK.md)"),
        "README links the runbook"
    );
    let mut cache = std::collections::HashMap::new();
    let mut help_of = |sub: &str| -> String {
        cache
            .entry(sub.to_owned())
            .or_insert_with(|| {
                let args: Vec<&str> = sub.split_whitespace().chain(["--help"]).collect();
                walship(&args).assert_ok().stdout
            })
            .clone()
    };

    // The checker itself catches what rots.
    for (bad, why) in [
        ("walship restore fruits --no-such-flag", "--no-such-flag"),
        ("walship resotre fruits", "no subcommand \"resotre\""),
        ("walship status -x fruits", "lists no -x"),
    ] {
        let cmds = walship_commands(&format!("```sh\n{bad}\n```\n"));
        let errors = check_against_help(&cmds[0], &mut help_of);
        assert!(errors.iter().any(|e| e.contains(why)), "{bad}: {errors:?}");
    }
    let cmds = walship_commands("x `walship list fruits | head -1` and\n```sh\nsystemctl stop a && walship status fruits --json   # c\n```\n");
    assert_eq!(
        cmds,
        [
            vec!["walship", "list", "fruits"],
            vec!["walship", "status", "fruits", "--json"]
        ]
    );

    let cmds = walship_commands(&runbook);
    let subs: std::collections::BTreeSet<&str> = cmds.iter().map(|c| c[1].as_str()).collect();
    for want in ["trust", "status", "list", "verify", "restore"] {
        assert!(
            subs.contains(want),
            "the runbook uses walship {want}: {subs:?}"
        );
    }
    assert!(
        cmds.len() >= 20,
        "only {} commands found: {cmds:?}",
        cmds.len()
    );
    let errors: Vec<String> = cmds
        .iter()
        .flat_map(|c| check_against_help(c, &mut help_of))
        .collect();
    assert!(errors.is_empty(), "docs/RUNBOOK.md:\n{}", errors.join("\n"));
}
