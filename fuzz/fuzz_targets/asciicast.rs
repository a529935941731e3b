//! The asciicast writer: every line is JSON, and the output events spell the lossy UTF-8
//! decoding of all terminal output, however it was cut into chunks.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use benchgate::recording::Recorder;
use libfuzzer_sys::fuzz_target;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses where chunks are cut; 0xff marks a resize between chunks.
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 17) + 1;
    let out = Shared::default();
    let mut recorder = Recorder::writing_to(
        "fuzz.cast".into(),
        Box::new(out.clone()),
        0,
        80,
        24,
        "xterm\"\n",
        "a\u{0}title",
    )
    .expect("header");
    let mut output = Vec::new();
    for chunk in data.chunks(step) {
        if chunk[0] == 0xff && chunk.len() > 2 {
            recorder.resize(u32::from(chunk[1]), u32::from(chunk[2]));
        }
        recorder.output(chunk);
        output.extend_from_slice(chunk);
    }
    recorder.finish();
    let cast = String::from_utf8(out.0.lock().expect("lock").clone()).expect("UTF-8 file");
    let mut lines = cast.lines();
    let header: serde_json::Value =
        serde_json::from_str(lines.next().expect("header")).expect("JSON");
    assert_eq!(header["version"], 2);
    let mut text = String::new();
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).expect("JSON event");
        if event[1] == "o" {
            text.push_str(event[2].as_str().expect("text"));
        }
    }
    assert_eq!(text, String::from_utf8_lossy(&output));
});
