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

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("{0}")]
    Generic(String),
    #[error("The command {0} has not been found")]
    CommandNotFound(String),
    #[error("{0}")]
    InvalidParameter(String),
}

pub trait CommandHandler: Send + Sync + 'static {
    fn commands(&self) -> Vec<&'static str>;
    fn execute(&self, name: &str, args: &serde_json::Map<String, Value>)
        -> Result<Value, QmpError>;
}
