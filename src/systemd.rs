//! Placeholder notifier until the systemd module lands.
use std::time::Duration;
/// sd_notify client.
#[derive(Debug, Default)]
pub struct Notifier;
impl Notifier {
    /// Ready.
    pub fn ready(&self) {}
    /// Status.
    pub fn status(&self, _s: &str) {}
    /// Watchdog.
    pub fn watchdog(&self) {}
    /// Stopping.
    pub fn stopping(&self) {}
    /// Interval.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        None
    }
}
