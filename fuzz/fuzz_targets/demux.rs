//! Docker's multiplexed exec stream: every payload byte reaches the stream its frame names,
//! in order, whatever the framing, and a cut frame is an error.
#![no_main]

use benchgate::docker::exec::demux;
use futures_util::FutureExt as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = demux(data, &mut out, &mut err)
        .now_or_never()
        .expect("ready");
    // A plain model of the format: 8-byte headers (stream, 0, 0, 0, big-endian length).
    let (mut want_out, mut want_err, mut rest) = (Vec::new(), Vec::new(), data);
    let complete = loop {
        if rest.is_empty() {
            break true;
        }
        if rest.len() < 8 {
            break false;
        }
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let to = if rest[0] == 2 {
            &mut want_err
        } else {
            &mut want_out
        };
        let payload = &rest[8..];
        to.extend_from_slice(&payload[..len.min(payload.len())]);
        if payload.len() < len {
            break false;
        }
        rest = &payload[len..];
    };
    assert_eq!(out, want_out);
    assert_eq!(err, want_err);
    match result {
        Ok(total) => {
            assert!(complete);
            assert_eq!(total as usize, out.len() + err.len());
        }
        Err(_) => assert!(!complete),
    }
});
