//! gRPC length-prefixed messages: a 1-byte flag (bit 0 = compressed, bit 7 = gRPC-Web trailer
//! frame) and a 4-byte big-endian length, then the payload.
//!
//! [`FrameDecoder`] takes body chunks as they arrive and yields whole frames; it refuses a frame
//! whose declared length is over its limit as soon as the 5-byte prefix is seen, so a peer
//! announcing 4 GiB makes it fail before anything is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the prefix before every message.
pub const PREFIX_LEN: usize = 5;
/// Flag bit of a compressed message.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Flag bit of a gRPC-Web trailer frame.
pub const FLAG_TRAILER: u8 = 0x80;

/// One frame of a gRPC (or gRPC-Web) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub flags: u8,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a gRPC message of {len} bytes is larger than the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("the body ended inside a gRPC message ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
}

/// `msg` with an uncompressed data prefix.
pub fn encode(msg: &[u8]) -> Bytes {
    encode_with_flags(0, msg)
}

/// `payload` with the given flag byte; the length is the payload's (saturating at `u32::MAX`,
/// which no caller reaches because every payload is bounded far below it).
pub fn encode_with_flags(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX_LEN + payload.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// Incremental frame decoder with a per-frame size limit.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    limit: usize,
}

impl FrameDecoder {
    /// `limit`: the largest payload accepted, in bytes.
    pub fn new(limit: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            limit,
        }
    }

    /// Appends a chunk of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.limit {
            return Err(FrameError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        if self.buf.len() < PREFIX_LEN + len {
            // Reserve once for the whole frame rather than growing chunk by chunk.
            self.buf.reserve(PREFIX_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(PREFIX_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Frame { flags, payload }))
    }

    /// Checks that the body ended on a frame boundary.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = if self.buf.len() < PREFIX_LEN {
            PREFIX_LEN
        } else {
            PREFIX_LEN
                + u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize
        };
        Err(FrameError::Truncated {
            have: self.buf.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_chunks_are_reassembled() {
        let a = encode(b"hello");
        let b = encode_with_flags(FLAG_TRAILER, b"grpc-status:0\r\n");
        let all: Vec<u8> = [a.as_ref(), b.as_ref()].concat();
        let mut d = FrameDecoder::new(100);
        let mut got = Vec::new();
        for byte in &all {
            d.push(std::slice::from_ref(byte));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload.as_ref(), b"hello");
        assert_eq!(got[0].flags, 0);
        assert_eq!(got[1].flags, FLAG_TRAILER);
    }

    #[test]
    fn an_announced_length_over_the_limit_fails_before_buffering() {
        let mut d = FrameDecoder::new(10);
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                limit: 10
            })
        );
    }

    #[test]
    fn a_body_ending_mid_frame_is_an_error() {
        let mut d = FrameDecoder::new(10);
        d.push(&[0, 0, 0, 0, 4, b'a']);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated { have: 6, want: 9 }));
        let mut d = FrameDecoder::new(10);
        d.push(&[0, 0]);
        assert_eq!(d.finish(), Err(FrameError::Truncated { have: 2, want: 5 }));
    }
}
