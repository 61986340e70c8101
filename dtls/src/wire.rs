//! DTLS 1.2 framing (RFC 6347 §4.1 and §4.2.2): record headers, handshake message headers, and the
//! handful of messages a PSK handshake uses. Parsing never panics: short or inconsistent input is
//! `None`.

pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

pub const HANDSHAKE_CLIENT_HELLO: u8 = 1;
pub const HANDSHAKE_SERVER_HELLO: u8 = 2;
pub const HANDSHAKE_HELLO_VERIFY_REQUEST: u8 = 3;
pub const HANDSHAKE_SERVER_KEY_EXCHANGE: u8 = 12;
pub const HANDSHAKE_SERVER_HELLO_DONE: u8 = 14;
pub const HANDSHAKE_CLIENT_KEY_EXCHANGE: u8 = 16;
pub const HANDSHAKE_FINISHED: u8 = 20;

pub const ALERT_LEVEL_FATAL: u8 = 2;
pub const ALERT_CLOSE_NOTIFY: u8 = 0;
pub const ALERT_HANDSHAKE_FAILURE: u8 = 40;
pub const ALERT_PROTOCOL_VERSION: u8 = 70;
pub const ALERT_DECRYPT_ERROR: u8 = 51;

pub const EXTENSION_EXTENDED_MASTER_SECRET: u16 = 0x0017;
pub const EXTENSION_RENEGOTIATION_INFO: u16 = 0xff01;
/// TLS_EMPTY_RENEGOTIATION_INFO_SCSV (RFC 5746): the client asks for renegotiation_info.
pub const SUITE_RENEGOTIATION_SCSV: u16 = 0x00ff;

pub const DTLS_1_2: u16 = 0xfefd;
/// RFC 6347 §4.2.1: a HelloVerifyRequest carries version DTLS 1.0 whatever is negotiated.
pub const DTLS_1_0: u16 = 0xfeff;

pub const RECORD_HEADER_BYTES: usize = 13;
pub const HANDSHAKE_HEADER_BYTES: usize = 12;
pub const RANDOM_BYTES: usize = 32;
pub const VERIFY_DATA_BYTES: usize = 12;
/// Cookie length sent in HelloVerifyRequest (a truncated HMAC-SHA256).
pub const COOKIE_BYTES: usize = 16;
/// Sequence numbers are 48 bits on the wire.
pub const SEQUENCE_MAX: u64 = (1 << 48) - 1;

/// One DTLS record as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub content_type: u8,
    pub version: u16,
    pub epoch: u16,
    pub sequence: u64,
    pub fragment: &'a [u8],
}

/// Splits the first record off `data`. A record whose length runs past the datagram is `None`
/// (the rest of the datagram is then unusable, RFC 6347 §4.1.2.7 drops it).
pub fn split_record(data: &[u8]) -> Option<(Record<'_>, &[u8])> {
    if data.len() < RECORD_HEADER_BYTES {
        return None;
    }
    let length = u16::from_be_bytes([data[11], data[12]]) as usize;
    let end = RECORD_HEADER_BYTES.checked_add(length)?;
    if data.len() < end {
        return None;
    }
    let record = Record {
        content_type: data[0],
        version: u16::from_be_bytes([data[1], data[2]]),
        epoch: u16::from_be_bytes([data[3], data[4]]),
        sequence: u64::from_be_bytes([0, 0, data[5], data[6], data[7], data[8], data[9], data[10]]),
        fragment: &data[RECORD_HEADER_BYTES..end],
    };
    Some((record, &data[end..]))
}

/// Writes a record header for a fragment of `length` bytes.
pub fn push_record_header(
    out: &mut Vec<u8>,
    content_type: u8,
    version: u16,
    epoch: u16,
    sequence: u64,
    length: usize,
) {
    out.push(content_type);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&sequence.to_be_bytes()[2..]);
    out.extend_from_slice(&(length as u16).to_be_bytes());
}

/// Writes a whole plaintext record.
pub fn push_record(
    out: &mut Vec<u8>,
    content_type: u8,
    epoch: u16,
    sequence: u64,
    fragment: &[u8],
) {
    push_record_header(out, content_type, DTLS_1_2, epoch, sequence, fragment.len());
    out.extend_from_slice(fragment);
}

/// One handshake message, unfragmented. `whole` is header and body as they enter the transcript.
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    pub message_type: u8,
    pub message_seq: u16,
    pub body: &'a [u8],
    pub whole: &'a [u8],
}

/// Splits the first handshake message off a handshake record's fragment. Fragmented handshake
/// messages are not reassembled (`None`): PSK flights are a few hundred bytes and fit any MTU.
pub fn split_handshake(data: &[u8]) -> Option<(Handshake<'_>, &[u8])> {
    if data.len() < HANDSHAKE_HEADER_BYTES {
        return None;
    }
    let length = u24(&data[1..4]);
    let message_seq = u16::from_be_bytes([data[4], data[5]]);
    let fragment_offset = u24(&data[6..9]);
    let fragment_length = u24(&data[9..12]);
    if fragment_offset != 0 || fragment_length != length {
        return None;
    }
    let end = HANDSHAKE_HEADER_BYTES + length;
    if data.len() < end {
        return None;
    }
    let message = Handshake {
        message_type: data[0],
        message_seq,
        body: &data[HANDSHAKE_HEADER_BYTES..end],
        whole: &data[..end],
    };
    Some((message, &data[end..]))
}

/// Writes an unfragmented handshake message (header and body).
pub fn push_handshake(out: &mut Vec<u8>, message_type: u8, message_seq: u16, body: &[u8]) {
    let length = (body.len() as u32).to_be_bytes();
    out.push(message_type);
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(&message_seq.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(body);
}

fn u24(bytes: &[u8]) -> usize {
    (bytes[0] as usize) << 16 | (bytes[1] as usize) << 8 | bytes[2] as usize
}

/// A cursor over a message body.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn bytes(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.data.len() < count {
            return None;
        }
        let (head, rest) = self.data.split_at(count);
        self.data = rest;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    pub fn vector8(&mut self) -> Option<&'a [u8]> {
        let length = self.u8()? as usize;
        self.bytes(length)
    }

    /// A vector with a two-byte length prefix.
    pub fn vector16(&mut self) -> Option<&'a [u8]> {
        let length = self.u16()? as usize;
        self.bytes(length)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// What is left to read.
    pub fn remaining(&self) -> &'a [u8] {
        self.data
    }
}

/// The fields of a ClientHello a PSK server looks at.
#[derive(Debug, Clone)]
pub struct ClientHello<'a> {
    /// client_version: the highest version the client speaks.
    pub version: u16,
    pub random: &'a [u8],
    pub cookie: &'a [u8],
    pub cipher_suites: &'a [u8],
    pub compression_methods: &'a [u8],
    /// Extension types offered, with their data.
    pub extensions: &'a [u8],
    /// The body before the cookie and after it: what the cookie is computed over.
    pub before_cookie: &'a [u8],
    pub after_cookie: &'a [u8],
}

impl<'a> ClientHello<'a> {
    pub fn parse(body: &'a [u8]) -> Option<Self> {
        let mut reader = Reader::new(body);
        let version = reader.u16()?;
        let random = reader.bytes(RANDOM_BYTES)?;
        let _session_id = reader.vector8()?;
        let before_cookie = &body[..body.len() - reader.data.len()];
        let cookie = reader.vector8()?;
        let after_cookie = reader.data;
        let cipher_suites = reader.vector16()?;
        if !cipher_suites.len().is_multiple_of(2) {
            return None;
        }
        let compression_methods = reader.vector8()?;
        let extensions = if reader.is_empty() {
            &[][..]
        } else {
            reader.vector16()?
        };
        Some(ClientHello {
            version,
            random,
            cookie,
            cipher_suites,
            compression_methods,
            extensions,
            before_cookie,
            after_cookie,
        })
    }

    pub fn suites(&self) -> impl Iterator<Item = u16> + '_ {
        self.cipher_suites
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
    }

    pub fn has_extension(&self, wanted: u16) -> bool {
        has_extension(self.extensions, wanted)
    }
}

/// Whether an extensions block (without its length prefix) holds extension `wanted`.
pub fn has_extension(mut extensions: &[u8], wanted: u16) -> bool {
    while extensions.len() >= 4 {
        let kind = u16::from_be_bytes([extensions[0], extensions[1]]);
        let length = u16::from_be_bytes([extensions[2], extensions[3]]) as usize;
        if kind == wanted {
            return true;
        }
        let Some(rest) = extensions.get(4 + length..) else {
            return false;
        };
        extensions = rest;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_records_and_fragmented_handshakes_are_refused() {
        let mut out = Vec::new();
        push_record(&mut out, CONTENT_HANDSHAKE, 0, 7, &[1, 2, 3]);
        let (record, rest) = split_record(&out).unwrap();
        assert_eq!(record.sequence, 7);
        assert_eq!(record.fragment, &[1, 2, 3]);
        assert!(rest.is_empty());
        assert!(split_record(&out[..out.len() - 1]).is_none());

        let mut message = Vec::new();
        push_handshake(&mut message, HANDSHAKE_FINISHED, 3, &[9; 12]);
        let (handshake, rest) = split_handshake(&message).unwrap();
        assert_eq!(handshake.message_seq, 3);
        assert_eq!(handshake.body, &[9; 12]);
        assert!(rest.is_empty());
        message[11] = 6; // fragment_length below length: a fragment
        assert!(split_handshake(&message).is_none());
    }

    #[test]
    fn client_hello_parse_survives_any_truncation() {
        let mut body = vec![0xfe, 0xfd];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 2, 0xaa, 0xbb, 0, 2, 0xc0, 0xa8, 1, 0]);
        body.extend_from_slice(&[0, 4, 0x00, 0x17, 0, 0]);
        let hello = ClientHello::parse(&body).unwrap();
        assert_eq!(hello.cookie, &[0xaa, 0xbb]);
        assert_eq!(hello.suites().collect::<Vec<_>>(), vec![0xc0a8]);
        assert!(hello.has_extension(EXTENSION_EXTENDED_MASTER_SECRET));
        for end in 0..body.len() {
            let _ = ClientHello::parse(&body[..end]);
        }
    }
}
