//! Accepts HTTP/2 requests whose `:authority` is a unix socket path.
//!
//! gRPC clients disagree on the `:authority` of a request sent over a unix
//! socket. The CRI client in crictl and critest before v1.31, and in older
//! kubelets, dials the bare socket path with a custom dialer, so grpc-go
//! sends that path as the authority. Others send `localhost`. The HTTP/2
//! server under tonic rejects a path there with `PROTOCOL_ERROR`, as RFC 9113
//! allows, so those clients could not talk to the daemon at all.
//!
//! Every accepted connection therefore goes through a relay that decodes the
//! header blocks the client sends, replaces an `:authority` that is not a
//! valid URI authority with `localhost`, and encodes each block again as
//! literals without indexing. The server's HPACK table then stays empty, so
//! the client's and the server's compression states cannot drift apart.
//! Every other frame, and everything the server sends, passes unchanged.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;

/// The fixed bytes an HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Authority that replaces a socket path.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Largest frame payload every HTTP/2 peer must accept (RFC 9113, 4.2).
const MAX_FRAME_PAYLOAD: usize = 16_384;

/// HPACK table size of the server, the protocol default that tonic keeps.
const HEADER_TABLE_SIZE: usize = 4_096;

/// Capacity of the in-memory pipe between the relay and the server.
const PIPE_CAPACITY: usize = 64 * 1024;

/// Starts the relay for one accepted connection and returns the stream the
/// gRPC server reads requests from and writes responses to.
pub(crate) fn relay_connection(client: UnixStream) -> DuplexStream {
    let (server_side, relay_side) = tokio::io::duplex(PIPE_CAPACITY);
    tokio::spawn(relay(client, relay_side));
    server_side
}

async fn relay(client: UnixStream, server: DuplexStream) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = tokio::io::split(server);

    let requests = async {
        let result = rewrite_requests(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
        result
    };
    let responses = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::pin!(requests, responses);

    // Once the server is done with the connection, nothing the client
    // sends matters. The other way round, responses still have to flow.
    tokio::select! {
        () = &mut responses => {}
        result = &mut requests => {
            if let Err(error) = result {
                tracing::debug!(%error, "closing a CRI connection with invalid HTTP/2 input");
            }
            responses.await;
        }
    }
}

/// Copies the client's byte stream to the server, re-encoding header blocks.
/// Returns at the client's end of stream.
async fn rewrite_requests<R, W>(client: &mut R, server: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    if !read_full(client, &mut preface).await? {
        return Ok(());
    }
    server.write_all(&preface).await?;
    if preface != PREFACE {
        // Not HTTP/2 with prior knowledge: let the server reject it.
        tokio::io::copy(client, server).await?;
        return Ok(());
    }

    let mut rewriter = HeaderRewriter::new();
    let mut pending: Option<PendingBlock> = None;
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        if !read_full(client, &mut header).await? {
            return Ok(());
        }
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let kind = header[3];
        let flags = header[4];
        let mut payload = vec![0u8; length];
        if !read_full(client, &mut payload).await? {
            return Err(invalid("connection closed inside a frame"));
        }

        match (kind, pending.as_mut()) {
            (FRAME_HEADERS, None) => {
                let block = PendingBlock::from_headers(&header, &payload)?;
                if flags & FLAG_END_HEADERS != 0 {
                    server.write_all(&rewriter.rewrite(&block)?).await?;
                } else {
                    pending = Some(block);
                }
            }
            (FRAME_CONTINUATION, Some(block)) => {
                block.fragment.extend_from_slice(&payload);
                if flags & FLAG_END_HEADERS != 0 {
                    server.write_all(&rewriter.rewrite(block)?).await?;
                    pending = None;
                }
            }
            (_, Some(_)) => {
                return Err(invalid("a header block was interrupted by another frame"));
            }
            _ => {
                server.write_all(&header).await?;
                server.write_all(&payload).await?;
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes. Returns false at a clean end of stream
/// before the first byte.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(invalid("connection closed inside a frame"))
            };
        }
        filled += n;
    }
    Ok(true)
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// A header block collected from a HEADERS frame and its CONTINUATIONs.
struct PendingBlock {
    stream_id: [u8; 4],
    end_stream: bool,
    /// Stream dependency and weight, kept when the HEADERS frame had them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl PendingBlock {
    /// Takes the block fragment out of a HEADERS frame, dropping padding.
    fn from_headers(header: &[u8; FRAME_HEADER_LEN], payload: &[u8]) -> io::Result<Self> {
        let flags = header[4];
        let mut body = payload;

        let mut padding = 0;
        if flags & FLAG_PADDED != 0 {
            let (&length, rest) = body
                .split_first()
                .ok_or_else(|| invalid("padded HEADERS frame without a pad length"))?;
            padding = usize::from(length);
            body = rest;
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            let (fields, rest) = body
                .split_first_chunk::<5>()
                .ok_or_else(|| invalid("HEADERS frame too short for its priority"))?;
            priority = Some(*fields);
            body = rest;
        }
        let fragment_len = body
            .len()
            .checked_sub(padding)
            .ok_or_else(|| invalid("HEADERS padding longer than the frame"))?;

        Ok(Self {
            stream_id: [header[5], header[6], header[7], header[8]],
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
            fragment: body[..fragment_len].to_vec(),
        })
    }
}

/// Decodes client header blocks and encodes them again for the server.
struct HeaderRewriter {
    decoder: loona_hpack::Decoder<'static>,
}

impl HeaderRewriter {
    fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self { decoder }
    }

    /// Returns the frames that carry `block` to the server, with a socket
    /// path in `:authority` replaced by `localhost`.
    fn rewrite(&mut self, block: &PendingBlock) -> io::Result<Vec<u8>> {
        let mut encoded = Vec::with_capacity(block.fragment.len() + 16);
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let value: &[u8] = if &*name == b":authority" && !is_authority(&value) {
                    LOCAL_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&mut encoded, &name, value);
            })
            .map_err(|error| invalid(&format!("invalid HPACK header block: {error:?}")))?;
        Ok(frame_block(block, &encoded))
    }
}

fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Appends a header field as a literal without indexing and with a new
/// name (RFC 7541, section 6.2.2), without Huffman coding.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_string(out, name);
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    encode_integer(out, bytes.len(), 7, 0x00);
    out.extend_from_slice(bytes);
}

/// Appends an HPACK integer with an N-bit prefix (RFC 7541, section 5.1).
fn encode_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8, first_byte_flags: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first_byte_flags | value as u8);
        return;
    }
    out.push(first_byte_flags | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push((value % 0x80) as u8 | 0x80);
        value /= 0x80;
    }
    out.push(value as u8);
}

/// Splits an encoded header block into a HEADERS frame and as many
/// CONTINUATION frames as the frame size limit needs.
fn frame_block(block: &PendingBlock, encoded: &[u8]) -> Vec<u8> {
    let priority_len = block.priority.map_or(0, |p| p.len());
    let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - priority_len);
    let (first, mut rest) = encoded.split_at(first_len);

    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }

    let mut frames = Vec::with_capacity(encoded.len() + 2 * FRAME_HEADER_LEN + priority_len);
    push_frame_header(
        &mut frames,
        first.len() + priority_len,
        FRAME_HEADERS,
        flags,
        block.stream_id,
    );
    if let Some(priority) = block.priority {
        frames.extend_from_slice(&priority);
    }
    frames.extend_from_slice(first);

    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        push_frame_header(
            &mut frames,
            chunk.len(),
            FRAME_CONTINUATION,
            flags,
            block.stream_id,
        );
        frames.extend_from_slice(chunk);
        rest = tail;
    }
    frames
}

fn push_frame_header(out: &mut Vec<u8>, length: usize, kind: u8, flags: u8, stream_id: [u8; 4]) {
    let length = u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&length[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes headers the way a client does, with indexing and Huffman.
    fn client_block(encoder: &mut loona_hpack::Encoder<'_>, headers: &[(&str, &str)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn headers_frame(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        push_frame_header(
            &mut frame,
            payload.len(),
            FRAME_HEADERS,
            flags,
            [0, 0, 0, 1],
        );
        frame.extend_from_slice(payload);
        frame
    }

    async fn run(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut output = Vec::new();
        rewrite_requests(&mut input.as_slice(), &mut output).await?;
        Ok(output)
    }

    /// Splits relayed bytes after the preface into (type, flags, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        bytes = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let length =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            frames.push((bytes[3], bytes[4], bytes[9..9 + length].to_vec()));
            bytes = &bytes[9 + length..];
        }
        frames
    }

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .expect("relayed block decodes with an empty table")
            .into_iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(&n).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect()
    }

    fn request(authority: &str) -> Vec<(&str, &str)> {
        vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.RuntimeService/Version"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    }

    #[tokio::test]
    async fn socket_path_authority_becomes_localhost() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = client_block(&mut encoder, &request("/run/hatoba/hatoba.sock"));
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(FLAG_END_HEADERS, &block));

        let output = run(input).await.expect("relay");

        let frames = frames(&output);
        assert_eq!(frames.len(), 1);
        let headers = decode(&frames[0].2);
        assert!(
            headers.contains(&(":authority".into(), "localhost".into())),
            "{headers:?}"
        );
        assert!(headers.contains(&(":path".into(), "/runtime.v1.RuntimeService/Version".into())));
    }

    #[tokio::test]
    async fn valid_authority_is_kept() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = client_block(&mut encoder, &request("localhost:1234"));
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(FLAG_END_HEADERS | FLAG_END_STREAM, &block));

        let output = run(input).await.expect("relay");

        let frames = frames(&output);
        assert_eq!(frames[0].1, FLAG_END_HEADERS | FLAG_END_STREAM);
        assert!(decode(&frames[0].2).contains(&(":authority".into(), "localhost:1234".into())));
    }

    #[tokio::test]
    async fn indexed_headers_of_later_requests_decode() {
        // The second block refers to entries the first one added to the
        // client's dynamic table: the relay must have tracked them.
        let mut encoder = loona_hpack::Encoder::new();
        let first = client_block(&mut encoder, &request("/run/a.sock"));
        let second = client_block(&mut encoder, &request("/run/a.sock"));
        assert!(
            second.len() < first.len(),
            "the encoder should index the repeated headers"
        );
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(FLAG_END_HEADERS, &first));
        input.extend(headers_frame(FLAG_END_HEADERS, &second));

        let output = run(input).await.expect("relay");

        let frames = frames(&output);
        assert_eq!(frames.len(), 2);
        assert_eq!(decode(&frames[0].2), decode(&frames[1].2));
    }

    #[tokio::test]
    async fn continuation_padding_and_priority_are_handled() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = client_block(&mut encoder, &request("/run/a.sock"));
        let (head, tail) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(head);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(FLAG_PADDED | FLAG_PRIORITY, &payload));
        push_frame_header(
            &mut input,
            tail.len(),
            FRAME_CONTINUATION,
            FLAG_END_HEADERS,
            [0, 0, 0, 1],
        );
        input.extend_from_slice(tail);

        let output = run(input).await.expect("relay");

        let frames = frames(&output);
        assert_eq!(frames.len(), 1);
        let (kind, flags, payload) = &frames[0];
        assert_eq!(*kind, FRAME_HEADERS);
        assert_eq!(*flags, FLAG_PRIORITY | FLAG_END_HEADERS);
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 15]);
        assert!(decode(&payload[5..]).contains(&(":authority".into(), "localhost".into())));
    }

    #[tokio::test]
    async fn large_blocks_are_split_into_continuations() {
        let mut encoder = loona_hpack::Encoder::new();
        let big = "x".repeat(40_000);
        let mut headers = request("/run/a.sock");
        headers.push(("x-big", &big));
        let block = client_block(&mut encoder, &headers);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(FLAG_END_HEADERS, &block));

        let output = run(input).await.expect("relay");

        let frames = frames(&output);
        assert!(frames.len() >= 3, "40 KB of headers need several frames");
        assert!(
            frames
                .iter()
                .all(|(_, _, payload)| payload.len() <= MAX_FRAME_PAYLOAD)
        );
        assert_eq!(
            frames.last().map(|f| f.1 & FLAG_END_HEADERS),
            Some(FLAG_END_HEADERS)
        );
        let block: Vec<u8> = frames.iter().flat_map(|f| f.2.clone()).collect();
        assert!(decode(&block).contains(&("x-big".into(), big.clone())));
    }

    #[tokio::test]
    async fn other_frames_pass_unchanged() {
        let mut input = PREFACE.to_vec();
        // SETTINGS with one entry, then a DATA frame on stream 1.
        input.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x3, 0, 0, 0, 100]);
        input.extend_from_slice(&[0, 0, 3, 0x0, 0x1, 0, 0, 0, 1, b'a', b'b', b'c']);

        let output = run(input.clone()).await.expect("relay");

        assert_eq!(output, input);
    }

    #[tokio::test]
    async fn interrupted_header_block_is_rejected() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = client_block(&mut encoder, &request("/run/a.sock"));
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(0, &block));
        input.extend_from_slice(&[0, 0, 3, 0x0, 0x1, 0, 0, 0, 1, b'a', b'b', b'c']);

        let error = run(input)
            .await
            .expect_err("a DATA frame inside a header block");

        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn integers_use_continuation_bytes_past_the_prefix() {
        let mut out = Vec::new();
        encode_integer(&mut out, 1337, 5, 0);
        assert_eq!(out, [31, 154, 10], "RFC 7541, C.1.2");
    }
}
