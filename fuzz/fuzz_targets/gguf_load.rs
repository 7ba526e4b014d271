//! A GGUF file, as bytes, loaded as a model and run for two tokens.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader maps a file; a fresh one per input, in memory where /dev/shm exists.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("phi3-fuzz-{}.gguf", std::process::id()));
    let mut file = std::fs::File::create(&path).expect("a scratch file");
    file.write_all(data).expect("the scratch file written");
    drop(file);
    let _ = phi3::fuzzing::load_and_run(&path);
    let _ = std::fs::remove_file(&path);
});
