//! A chat template and the messages it renders: the input's first line (up to a NUL byte) is
//! the template, the rest alternate role and content, separated by NUL bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let template = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let messages: Vec<(String, String)> = rest
        .chunks(2)
        .map(|pair| {
            (
                pair[0].to_string(),
                pair.get(1).copied().unwrap_or("").to_string(),
            )
        })
        .collect();
    let _ = phi3::fuzzing::render_template(template, &messages);
});
