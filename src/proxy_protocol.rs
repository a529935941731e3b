//! PROXY protocol v1 and v2 headers from a load balancer: the real client address, parsed
//! with a bound on every length, reading no byte past the header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's limit).
const V1_MAX_BYTES: usize = 107;
/// Longest v2 address block accepted (addresses plus TLVs).
const V2_MAX_BLOCK_BYTES: usize = 1024;

/// Why a header is refused (the connection is then closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// The header is malformed.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// The connection ended or failed while reading.
    #[error("connection ended in the PROXY header")]
    Io,
}

/// Reads one PROXY header from `stream` and returns the client address it names, or `None`
/// for a header that names none (v1 `UNKNOWN`, v2 `LOCAL`, health checks).
pub async fn read_header(
    stream: &mut (impl AsyncRead + Unpin),
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut start = [0u8; 8];
    stream
        .read_exact(&mut start)
        .await
        .map_err(|_| ProxyError::Io)?;
    if start == V2_SIGNATURE[..8] {
        let mut rest = [0u8; 8];
        stream
            .read_exact(&mut rest)
            .await
            .map_err(|_| ProxyError::Io)?;
        if rest[..4] != V2_SIGNATURE[8..] {
            return Err(ProxyError::Missing);
        }
        let len = usize::from(u16::from_be_bytes([rest[6], rest[7]]));
        if len > V2_MAX_BLOCK_BYTES {
            return Err(ProxyError::Malformed("v2 address block too long"));
        }
        let mut block = vec![0u8; len];
        stream
            .read_exact(&mut block)
            .await
            .map_err(|_| ProxyError::Io)?;
        parse_v2(rest[4], rest[5], &block)
    } else if &start[..6] == b"PROXY " {
        let mut line = start.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX_BYTES {
                return Err(ProxyError::Malformed("v1 header too long"));
            }
            line.push(stream.read_u8().await.map_err(|_| ProxyError::Io)?);
        }
        parse_v1(&line)
    } else {
        Err(ProxyError::Missing)
    }
}

/// Parses a whole v1 line, `PROXY ...\r\n`.
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let text =
        std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("v1 header is not text"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(ProxyError::Malformed("v1 header without CRLF"))?;
    let words: Vec<&str> = text.split(' ').collect();
    match words.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), source, _destination, source_port, _destination_port] =>
        {
            let ip: IpAddr = source
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source address"))?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError::Malformed("v1 address family"));
            }
            let port: u16 = source_port
                .parse()
                .map_err(|_| ProxyError::Malformed("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(ProxyError::Malformed("v1 header fields")),
    }
}

/// Parses a v2 header's version/command byte, family byte and address block.
pub fn parse_v2(
    version_command: u8,
    family: u8,
    block: &[u8],
) -> Result<Option<SocketAddr>, ProxyError> {
    if version_command >> 4 != 2 {
        return Err(ProxyError::Malformed("v2 version"));
    }
    match version_command & 0x0f {
        0 => return Ok(None),
        1 => {}
        _ => return Err(ProxyError::Malformed("v2 command")),
    }
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match family >> 4 {
        // IPv4: source, destination (4 bytes each), source port, destination port.
        1 if block.len() >= 12 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Ok(Some(SocketAddr::new(ip.into(), port(8))))
        }
        2 if block.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            Ok(Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                port(32),
            )))
        }
        1 | 2 => Err(ProxyError::Malformed("v2 address block too short")),
        // AF_UNSPEC or AF_UNIX: no client address to use.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut reader = bytes;
        let result = read_header(&mut reader).await;
        (result, reader.to_vec())
    }

    #[tokio::test]
    async fn v1_gives_the_client_address_and_reads_no_further() {
        let (addr, rest) = read(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 2222\r\nSSH-2.0-x").await;
        assert_eq!(addr, Ok(Some("10.1.2.3:5555".parse().unwrap())));
        assert_eq!(rest, b"SSH-2.0-x");
        let (addr, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n").await;
        assert_eq!(addr, Ok(Some("[2001:db8::1]:1".parse().unwrap())));
        let (addr, rest) = read(b"PROXY UNKNOWN\r\nSSH").await;
        assert_eq!((addr, rest), (Ok(None), b"SSH".to_vec()));
    }

    #[tokio::test]
    async fn v2_gives_the_client_address_and_reads_no_further() {
        let mut block = vec![192, 0, 2, 9, 10, 0, 0, 1, 0x1f, 0x90, 0x08, 0xae];
        block.extend_from_slice(&[0x04, 0, 1, 0xaa]); // a TLV, skipped
        let mut bytes = v2(1, 0x11, &block);
        bytes.extend_from_slice(b"SSH-2.0-x");
        let (addr, rest) = read(&bytes).await;
        assert_eq!(addr, Ok(Some("192.0.2.9:8080".parse().unwrap())));
        assert_eq!(rest, b"SSH-2.0-x");
        let mut six = vec![0u8; 36];
        six[15] = 1;
        six[32..34].copy_from_slice(&22u16.to_be_bytes());
        assert_eq!(
            read(&v2(1, 0x21, &six)).await.0,
            Ok(Some("[::1]:22".parse().unwrap()))
        );
        assert_eq!(read(&v2(0, 0x00, &[])).await.0, Ok(None));
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        assert_eq!(
            read(b"SSH-2.0-OpenSSH_9.2\r\n").await.0,
            Err(ProxyError::Missing)
        );
        assert_eq!(
            read(b"PROXY TCP4 10.1.2.3 10.0.0.1 99999 2\r\n").await.0,
            Err(ProxyError::Malformed("v1 source port"))
        );
        assert_eq!(
            read(b"PROXY TCP4 ::1 ::1 1 2\r\n").await.0,
            Err(ProxyError::Malformed("v1 address family"))
        );
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert_eq!(
            read(long.as_bytes()).await.0,
            Err(ProxyError::Malformed("v1 header too long"))
        );
        assert_eq!(
            read(&v2(1, 0x11, &[1, 2, 3])).await.0,
            Err(ProxyError::Malformed("v2 address block too short"))
        );
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            read(&huge).await.0,
            Err(ProxyError::Malformed("v2 address block too long"))
        );
        assert_eq!(read(b"PROXY").await.0, Err(ProxyError::Io));
    }

    #[tokio::test]
    async fn truncated_and_random_headers_never_panic() {
        let good = v2(1, 0x21, &[7u8; 36]);
        for len in 0..good.len() {
            let _ = read(&good[..len]).await;
        }
        let v1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        for len in 0..v1.len() {
            let _ = read(&v1[..len]).await;
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..3000 {
            let mut bytes = if round % 2 == 0 {
                V2_SIGNATURE.to_vec()
            } else {
                b"PROXY ".to_vec()
            };
            for _ in 0..(state % 120) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            let _ = read(&bytes).await;
        }
    }
}
