//! walship's integration tests: one test binary, a module per area.

mod conformance;
mod e2e;
mod sshd;
mod target_file;
mod target_sftp;
mod util;
