//! `walship generate-docs` (packaging): man pages and shell completions from the clap
//! definition, so they never disagree with `--help`.
//!
//! Writes `DIR/man/walship.1` and `DIR/man/walship-COMMAND.1` (clap_mangen) and
//! `DIR/completions/{walship.bash,_walship,walship.fish}`. walship(1) adds what `--help` has
//! no room for: EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO (kept here, next to the code
//! whose behaviour they describe: `main`'s exit codes, the variables the code reads).

use super::{Cli, GenerateDocsArgs};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

pub(super) fn run(a: GenerateDocsArgs) -> Result<ExitCode> {
    generate_docs(&a.dir)?;
    Ok(ExitCode::SUCCESS)
}

fn generate_docs(dir: &Path) -> Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    std::fs::create_dir_all(&comp).with_context(|| format!("cannot create {}", comp.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("cannot write man pages into {}", man.display()))?;
    let main_page = man.join("walship.1");
    let mut text = Vec::new();
    render_main_page(cmd.clone(), &mut text).context("cannot render walship.1")?;
    let text = once_preamble(&String::from_utf8_lossy(&text)).into_bytes();
    crate::durable::write_file_atomic(&main_page, &mut text.as_slice(), 0o644)
        .with_context(|| format!("cannot write {}", main_page.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "walship", &comp)
            .with_context(|| format!("cannot write completions into {}", comp.display()))?;
    }
    Ok(())
}

/// walship(1): clap_mangen's sections (the after-help, meant for the terminal, left out: the
/// sections below say the same at length), then [`MAIN_PAGE_SECTIONS`] before VERSION.
fn render_main_page(cmd: clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.disable_help_subcommand(true));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    w.write_all(MAIN_PAGE_SECTIONS.as_bytes())?;
    man.render_version_section(w)
}

/// `page` with roff's `Aq` preamble (which each clap_mangen section renders) only at the top.
fn once_preamble(page: &str) -> String {
    const PREAMBLE: [&str; 2] = [".ie \\n(.g .ds Aq \\(aq", ".el .ds Aq '"];
    let mut out = String::with_capacity(page.len());
    let mut seen = [false; 2];
    for line in page.lines() {
        if let Some(i) = PREAMBLE.iter().position(|p| *p == line) {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// EXIT STATUS, ENVIRONMENT, FILES, SEE ALSO of walship(1), in roff.
const MAIN_PAGE_SECTIONS: &str = r#".SH "EXIT STATUS"
.TP
.B 0
Success.
\fBwalship status\fR: healthy.
\fBwalship restore \-\-if\-db\-not\-exists\fR or \fB\-\-if\-replica\-exists\fR: nothing to do.
.TP
.B 1
The command failed (a replica unreachable or damaged, a checksum that does not match,
\fBwalship verify\fR finding a difference, ...); one line \fBwalship: \fIwhat failed\fB: \fIwhy\fR on standard error.
.TP
.B 3, 4, 5, 6
\fBwalship status\fR only: 3 the daemon is not running, 4 a replica or the database fails,
5 the lag is above \fB\-\-max\-lag\fR, 6 the daemon is starting (see \fBwalship\-status\fR(1)).
.TP
.B 64
Bad arguments (EX_USAGE): an unknown command or option, missing or conflicting arguments,
a malformed URL, time or duration on the command line; also \fBwalship\fR with no command.
.TP
.B 69
\fBwalship replicate\fR stopped with commits not yet on every replica (EX_UNAVAILABLE):
they wait in the state directory's spool and are shipped on the next start.
.TP
.B 75
Another walship already replicates this database (EX_TEMPFAIL); its pid is named.
.TP
.B 78
Configuration error (EX_CONFIG): the configuration file is missing, unreadable or invalid
(file, line and column are named). The unit \fBwalship@.service\fR is not restarted on it.
.TP
.B 141
Standard output was closed before walship finished writing to it
(\fBwalship list\fR \fIURL\fR \fB| head \-1\fR), as for a tool killed by SIGPIPE; nothing is printed.
\fBwalship status\fR keeps its own exit status then.
.SH ENVIRONMENT
.TP
.B WALSHIP_CONFIG
The default for \fB\-\-config\fR.
.TP
.B WALSHIP_CONFIG_DIR
Where instance names are looked up: \fINAME\fR means \fB$WALSHIP_CONFIG_DIR/\fINAME\fB.toml\fR
(default \fB/etc/walship\fR). The systemd generator always reads \fB/etc/walship\fR.
.TP
.BR WALSHIP_LOG ", " RUST_LOG
Log filter (tracing EnvFilter syntax, e.g. \fBwalship=debug,warn\fR); WALSHIP_LOG wins.
Default \fBwalship=info,warn\fR for \fBreplicate\fR, warnings only for the other commands.
.TP
.B NO_COLOR
No colours in log lines on a terminal.
.TP
.B STATE_DIRECTORY
Set by systemd (\fBStateDirectory=\fR): the default state directory.
.TP
.BR XDG_STATE_HOME ", " HOME
Outside the unit, the default state directory of a database given by path is
\fB/var/lib/walship/\fIPATH\fR for root, else \fB$XDG_STATE_HOME/walship/\fIPATH\fR, else
\fB$HOME/.local/state/walship/\fIPATH\fR (\fIPATH\fR: the database's path, \fB/\fR turned into \fB\-\fR).
.TP
.B CREDENTIALS_DIRECTORY
Set by systemd (\fBLoadCredential=\fR): private keys (\fBwalship\-key\-\fIREPLICA\fR),
key passphrases (\fBwalship\-passphrase\-\fIREPLICA\fR) and S3 credentials files
(\fBwalship\-s3\-\fIREPLICA\fR) are taken from there before the configured paths.
.TP
.BR NOTIFY_SOCKET ", " WATCHDOG_USEC ", " WATCHDOG_PID
Set by systemd for \fBType=notify\fR: readiness, status and watchdog notifications.
.TP
.B JOURNAL_STREAM
Set by systemd: when standard error is the journal, log records go to journald with fields.
.TP
.BR AWS_ACCESS_KEY_ID ", " AWS_SECRET_ACCESS_KEY ", " AWS_SESSION_TOKEN
S3 credentials for a replica without \fBcredentials\-file\fR.
.TP
.BR SSL_CERT_FILE ", " SSL_CERT_DIR
CA certificates for https:// S3 endpoints (OpenSSL's; default: the system store).
.SH FILES
.TP
.I /etc/walship/NAME.toml
The configuration of instance \fINAME\fR, replicated by the unit \fBwalship@\fINAME\fB.service\fR
(see \fBwalship.toml\fR(5)).
.TP
.I /etc/walship/known_hosts
Host keys of sftp targets (OpenSSH format); \fBwalship trust\fR adds them. An unknown or
changed key is refused.
.TP
.I /etc/walship/replicator.key
The usual place of an sftp replica's private key (\fBkey\-path\fR), owned by root, mode 0600;
passphrase and S3 credentials files likewise. The unit receives them as credentials.
.TP
.I /var/lib/walship/NAME
The state directory of instance \fINAME\fR: the spool of captured commits, the status file,
the lock.
.TP
.I /usr/lib/systemd/system/walship\-follow@.service
The warm-standby unit: \fBwalship\-follow@\fINAME\fB.service\fR runs
\fBwalship restore \-\-follow \-\-force \-\-config\fR \fI/etc/walship/NAME.toml\fR on a standby host.
.TP
.I /run/systemd/generator/walship@NAME.service.d/50\-walship\-generated.conf
Written by walship\-generator at boot and on \fBsystemctl daemon\-reload\fR: the database's
owner as \fBUser=\fR, its directory as \fBReadWritePaths=\fR, the credentials.
.TP
.I /usr/share/doc/walship/
RUNBOOK.md (set-up, disaster recovery, S3), systemd.md (the unit and its sandbox).
.SH "SEE ALSO"
\fBwalship\-replicate\fR(1), \fBwalship\-restore\fR(1), \fBwalship\-verify\fR(1),
\fBwalship\-list\fR(1), \fBwalship\-status\fR(1), \fBwalship\-trust\fR(1),
\fBwalship.toml\fR(5), \fBsystemd.exec\fR(5), \fBsqlite3\fR(1), \fBsshd_config\fR(5).
.PP
The packages install these manuals and the bash, zsh and fish completions; from a source
build, \fBwalship generate\-docs\fR \fIDIR\fR writes them into \fIDIR\fB/man\fR and
\fIDIR\fB/completions\fR.
"#;
