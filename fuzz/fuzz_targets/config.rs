//! The configuration loader: any text is accepted or refused with a located error, and an
//! accepted configuration renders (`check-config --print`) to TOML that parses to the same.
#![no_main]

use std::path::Path;

use benchgate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match Config::parse(path, text) {
        Ok(config) => {
            let rendered = config.to_toml();
            let again = Config::parse(path, &rendered)
                .unwrap_or_else(|e| panic!("rendered config does not parse: {e}\n{rendered}"));
            assert_eq!(again.to_toml(), rendered);
        }
        Err(error) => {
            if let Some(line) = error.line {
                assert!(line >= 1 && line <= text.lines().count().max(1), "{error}");
            }
        }
    }
});
