//! Placeholder until the QMP server lands: only the event sender API.
use serde_json::Value;

#[derive(Clone, Default)]
pub struct EventSender {}

impl EventSender {
    pub fn new() -> Self {
        EventSender {}
    }
    pub fn emit(&self, event: &str, data: Value) {
        log::info!("event {event}: {data}");
    }
}
