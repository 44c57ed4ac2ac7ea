//! walship's integration tests: one test binary, a module per area.

mod backend_file;
mod backend_s3;
mod backend_sftp;
mod conformance;
mod daemon_notify;
mod e2e;
mod e2e_apps;
mod e2e_restore_ops;
mod e2e_s3;
mod e2e_sftp;
mod e2e_single_writer;
mod e2e_startup_errors;
mod e2e_status;
mod faulty;
mod garage;
mod generator;
mod lifecycle;
mod netns;
mod notify;
mod packaging;
mod sshd;
mod systemd_files;
mod util;
