//! Splitting a client's byte stream into JSON requests.

use serde_json::Value;

/// One unit of client input.
#[derive(Debug)]
pub enum Input {
    /// A complete JSON value (not necessarily an object).
    Request(Value),
    /// Malformed JSON; the offending bytes were discarded up to the next newline.
    ParseError(String),
    /// An incomplete value grew beyond the limit.
    TooLarge,
}

/// Accumulates client bytes and splits them into JSON values.
///
/// [`push`](Self::push) bytes as they arrive, then drain what is complete with
/// [`next`](Iterator::next). The iterator is not fused: `None` means "nothing complete yet",
/// and pushing more bytes can make it yield again.
pub struct InputBuffer {
    buf: Vec<u8>,
    /// Start of the unparsed bytes in `buf`.
    start: usize,
    /// After a parse error whose line did not end in the buffer: drop input up to the next
    /// newline.
    skip_line: bool,
    max: usize,
}

impl InputBuffer {
    /// An empty buffer; an incomplete value longer than `max` bytes yields [`Input::TooLarge`].
    pub fn new(max: usize) -> Self {
        InputBuffer {
            buf: Vec::new(),
            start: 0,
            skip_line: false,
            max,
        }
    }

    /// Appends bytes read from the client.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.skip_line {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    data = &data[i + 1..];
                    self.skip_line = false;
                }
                None => return,
            }
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }
}

impl Iterator for InputBuffer {
    type Item = Input;

    /// The next complete unit of input, or `None` until more bytes are pushed.
    fn next(&mut self) -> Option<Input> {
        let pending = &self.buf[self.start..];
        let mut stream = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
        match stream.next() {
            None => {
                // Only whitespace left.
                self.buf.clear();
                self.start = 0;
                None
            }
            Some(Ok(v)) => {
                self.start += stream.byte_offset();
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Some(Input::Request(v))
            }
            Some(Err(e)) if e.is_eof() => {
                if pending.len() > self.max {
                    self.buf.clear();
                    self.start = 0;
                    Some(Input::TooLarge)
                } else {
                    None
                }
            }
            Some(Err(e)) => {
                // Resynchronise at the end of the line holding the error.
                let at = error_offset(pending, e.line(), e.column());
                match pending[at..].iter().position(|&b| b == b'\n') {
                    Some(nl) => self.start += at + nl + 1,
                    None => {
                        self.buf.clear();
                        self.start = 0;
                        self.skip_line = true;
                    }
                }
                Some(Input::ParseError(format!("JSON parse error, {e}")))
            }
        }
    }
}

/// Byte offset of serde_json's (1-based line, byte column) error position, clamped to the
/// data. The column may point just past the offending byte, so step back one.
fn error_offset(data: &[u8], line: usize, column: usize) -> usize {
    let mut line_start = 0;
    let mut lines_left = line.saturating_sub(1);
    while lines_left > 0 {
        match data[line_start..].iter().position(|&b| b == b'\n') {
            Some(nl) => line_start += nl + 1,
            None => break,
        }
        lines_left -= 1;
    }
    (line_start + column.saturating_sub(1)).min(data.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn input_buffer_resyncs_and_caps() {
        let mut b = InputBuffer::new(64);
        b.push(b"  {\"a\":\n  bad}\n{\"b\": 1}\n");
        assert!(matches!(b.next(), Some(Input::ParseError(_))));
        assert_eq!(b.next().unwrap_request(), json!({"b": 1}));
        assert!(b.next().is_none());

        b.push(b"{\"a\": 1");
        assert!(b.next().is_none());
        b.push(b"}   \n\n ");
        assert_eq!(b.next().unwrap_request(), json!({"a": 1}));
        assert!(b.next().is_none());
        assert!(b.buf.is_empty(), "whitespace is not kept");

        b.push(b"\"");
        b.push(&[b'x'; 100]);
        assert!(matches!(b.next(), Some(Input::TooLarge)));
        assert!(b.next().is_none());
    }

    trait UnwrapRequest {
        fn unwrap_request(self) -> Value;
    }

    impl UnwrapRequest for Option<Input> {
        fn unwrap_request(self) -> Value {
            match self {
                Some(Input::Request(v)) => v,
                other => panic!("expected a request, got {other:?}"),
            }
        }
    }
}
