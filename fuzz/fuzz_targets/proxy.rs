//! PROXY protocol v1/v2 headers as the listener reads them: never a byte past the header,
//! and an address only from a header that names one.
#![no_main]

use benchgate::proxy_protocol::read_header;
use futures_util::FutureExt as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    // Reads from a slice never wait: the future is ready at its first poll.
    let result = read_header(&mut stream).now_or_never().expect("ready");
    let used = data.len() - stream.len();
    if result.is_ok() {
        // v1 is at most 107 bytes; v2 is 16 bytes plus a block of at most 1024.
        assert!(used <= 16 + 1024, "read {used} bytes");
        if data.starts_with(b"PROXY ") {
            assert!(data[..used].ends_with(b"\r\n"));
        }
    }
});
