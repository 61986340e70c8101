//! CoAP message format (RFC 7252 §3) without copies: [`Message::parse`] borrows the token,
//! option values and payload from the datagram, and [`write`] encodes a response into a reused
//! buffer. coap-lite is the reference both are cross-checked against (`tests/message.rs`).

/// Longest token (RFC 7252 §3: token lengths 9-15 are reserved).
pub const TOKEN_BYTES_MAX: usize = 8;

/// Message types (RFC 7252 §3).
pub const TYPE_CONFIRMABLE: u8 = 0;
pub const TYPE_NON_CONFIRMABLE: u8 = 1;
pub const TYPE_ACKNOWLEDGEMENT: u8 = 2;
pub const TYPE_RESET: u8 = 3;

/// The byte that ends the options and starts the payload.
const PAYLOAD_MARKER: u8 = 0xff;

/// Why a datagram is not a well-formed CoAP message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than the 4-byte header")]
    TooShort,
    #[error("version is not 1")]
    Version,
    #[error("token length above 8")]
    TokenLength,
    #[error("token beyond the datagram")]
    TruncatedToken,
    /// An option delta or length nibble of 15 outside the payload marker.
    #[error("reserved option nibble 15")]
    ReservedNibble,
    #[error("option beyond the datagram")]
    TruncatedOption,
    #[error("option number above 65535")]
    OptionNumber,
    #[error("payload marker without a payload")]
    EmptyPayload,
}

/// A well-formed CoAP message borrowing from its datagram.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// 0 CON, 1 NON, 2 ACK, 3 RST.
    pub message_type: u8,
    /// Class (3 bits) and detail (5 bits).
    pub code: u8,
    pub message_id: u16,
    pub token: &'a [u8],
    /// The encoded options (validated): iterate with [`Message::options`].
    options: &'a [u8],
    /// Empty when there is no payload marker.
    pub payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// Parses and validates a datagram: version 1, token length at most 8, option deltas and
    /// lengths with their 13/14 extensions within the datagram, nibble 15 only as the payload
    /// marker (0xFF), option numbers within 16 bits, and a payload marker followed by a
    /// non-empty payload.
    pub fn parse(datagram: &'a [u8]) -> Result<Message<'a>, ParseError> {
        let [first, code, high, low, ..] = *datagram else {
            return Err(ParseError::TooShort);
        };
        if first >> 6 != 1 {
            return Err(ParseError::Version);
        }
        let token_length = usize::from(first & 0x0f);
        if token_length > TOKEN_BYTES_MAX {
            return Err(ParseError::TokenLength);
        }
        let options_start = 4 + token_length;
        let token = datagram
            .get(4..options_start)
            .ok_or(ParseError::TruncatedToken)?;
        let rest = &datagram[options_start..];
        let mut reader = OptionReader {
            bytes: rest,
            at: 0,
            number: 0,
        };
        while reader.next_option()?.is_some() {}
        let options_end = reader.at;
        let payload = match rest.get(options_end) {
            None => &[][..],
            // next_option stops only at the end or at the marker.
            Some(_) => {
                let payload = &rest[options_end + 1..];
                if payload.is_empty() {
                    return Err(ParseError::EmptyPayload);
                }
                payload
            }
        };
        Ok(Message {
            message_type: (first >> 4) & 0x3,
            code,
            message_id: u16::from_be_bytes([high, low]),
            token,
            options: &rest[..options_end],
            payload,
        })
    }

    /// The options in wire order (so in ascending number order): (number, value).
    pub fn options(&self) -> Options<'a> {
        Options(OptionReader {
            bytes: self.options,
            at: 0,
            number: 0,
        })
    }

    /// The value of the first option numbered `number`.
    pub fn option(&self, number: u16) -> Option<&'a [u8]> {
        self.options()
            .skip_while(|&(n, _)| n < number)
            .take_while(|&(n, _)| n == number)
            .map(|(_, value)| value)
            .next()
    }

    /// The values of every option numbered `number`, in order.
    pub fn option_values(&self, number: u16) -> impl Iterator<Item = &'a [u8]> {
        self.options()
            .skip_while(move |&(n, _)| n < number)
            .take_while(move |&(n, _)| n == number)
            .map(|(_, value)| value)
    }
}

/// Iterator over validated options.
#[derive(Clone)]
pub struct Options<'a>(OptionReader<'a>);

impl<'a> Iterator for Options<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        // The options were validated by Message::parse: an error cannot happen; stop if it did.
        self.0.next_option().ok().flatten()
    }
}

#[derive(Clone)]
struct OptionReader<'a> {
    bytes: &'a [u8],
    at: usize,
    number: u32,
}

impl<'a> OptionReader<'a> {
    /// The next option, or None at the end of the bytes or at the payload marker (left unread).
    fn next_option(&mut self) -> Result<Option<(u16, &'a [u8])>, ParseError> {
        let Some(&byte) = self.bytes.get(self.at) else {
            return Ok(None);
        };
        if byte == PAYLOAD_MARKER {
            return Ok(None);
        }
        self.at += 1;
        let delta = self.extended(byte >> 4)?;
        let length = self.extended(byte & 0x0f)?;
        self.number += delta;
        if self.number > u32::from(u16::MAX) {
            return Err(ParseError::OptionNumber);
        }
        let end = self.at + length as usize;
        let value = self
            .bytes
            .get(self.at..end)
            .ok_or(ParseError::TruncatedOption)?;
        self.at = end;
        Ok(Some((self.number as u16, value)))
    }

    /// An option delta or length from its nibble and extension bytes (RFC 7252 §3.1).
    fn extended(&mut self, nibble: u8) -> Result<u32, ParseError> {
        match nibble {
            0..=12 => Ok(u32::from(nibble)),
            13 => {
                let byte = *self.bytes.get(self.at).ok_or(ParseError::TruncatedOption)?;
                self.at += 1;
                Ok(u32::from(byte) + 13)
            }
            14 => {
                let bytes = self
                    .bytes
                    .get(self.at..self.at + 2)
                    .ok_or(ParseError::TruncatedOption)?;
                self.at += 2;
                Ok(u32::from(u16::from_be_bytes([bytes[0], bytes[1]])) + 269)
            }
            _ => Err(ParseError::ReservedNibble),
        }
    }
}

/// Encodes a message into `out` (cleared first). `options` in ascending number order, each value
/// a uint (RFC 7252 §3.2, shortest form). `token` at most 8 bytes.
pub fn write(
    out: &mut Vec<u8>,
    message_type: u8,
    code: u8,
    message_id: u16,
    token: &[u8],
    options: &[(u16, u32)],
    payload: &[u8],
) {
    out.clear();
    let token = &token[..token.len().min(TOKEN_BYTES_MAX)];
    let [high, low] = message_id.to_be_bytes();
    out.extend_from_slice(&[
        0x40 | (message_type & 0x3) << 4 | token.len() as u8,
        code,
        high,
        low,
    ]);
    out.extend_from_slice(token);
    let mut last = 0u16;
    for &(number, value) in options {
        let bytes = value.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        write_option(out, number.wrapping_sub(last), &bytes[skip..]);
        last = number;
    }
    if !payload.is_empty() {
        out.push(PAYLOAD_MARKER);
        out.extend_from_slice(payload);
    }
}

fn write_option(out: &mut Vec<u8>, delta: u16, value: &[u8]) {
    fn nibble(n: usize) -> (u8, [u8; 2], usize) {
        match n {
            0..=12 => (n as u8, [0, 0], 0),
            13..=268 => (13, [(n - 13) as u8, 0], 1),
            _ => {
                let [high, low] = ((n - 269) as u16).to_be_bytes();
                (14, [high, low], 2)
            }
        }
    }
    let (delta_nibble, delta_bytes, delta_len) = nibble(usize::from(delta));
    let (length_nibble, length_bytes, length_len) = nibble(value.len());
    out.push(delta_nibble << 4 | length_nibble);
    out.extend_from_slice(&delta_bytes[..delta_len]);
    out.extend_from_slice(&length_bytes[..length_len]);
    out.extend_from_slice(value);
}
