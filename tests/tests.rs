//! walship's integration tests: one test binary, a module per area.

mod backend_file;
mod backend_s3;
mod backend_s3_moto;
mod backend_sftp;
mod cli_conventions;
mod cli_truths;
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
mod metrics;
mod netns;
mod notify;
mod packaging;
mod sshd;
mod systemd_files;
mod util;
