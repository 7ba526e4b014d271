//! Constraints on the trained tiny model: every sampled answer matches, hostile constraints are
//! errors before any token, and the engine answers normally afterwards.

use std::sync::Arc;

use super::*;
use crate::engine::{Engine, EngineOptions, Prompt};
use crate::generate::{Event, FinishReason, GenerationParams, Stats};
use crate::sampling::SamplingParams;
use crate::test_support::fixture;

fn engine() -> Arc<Engine> {
    let options = EngineOptions {
        threads: Some(1),
        ..EngineOptions::default()
    };
    Arc::new(Engine::load(&fixture("tiny-phi3-haiku-q4_k_m.gguf"), &options).unwrap())
}

fn params(constraint: Constraint, seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens: 60,
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        constraint: Some(constraint),
        ..GenerationParams::default()
    }
}

/// The answer, the concatenated token texts and the stats.
fn run(engine: &Arc<Engine>, prompt: &str, params: GenerationParams) -> (String, String, Stats) {
    let mut generation = engine
        .generate(&Prompt::Text(prompt.into()), params)
        .unwrap();
    let (mut text, mut tokens) = (String::new(), String::new());
    loop {
        match generation.step().unwrap() {
            Event::Token(piece) => {
                text.push_str(&piece.text);
                tokens.push_str(&piece.token_text);
            }
            Event::Finished { text: tail } => {
                text.push_str(&tail);
                return (text, tokens, generation.stats().clone());
            }
            Event::Prefilled => {}
        }
    }
}

#[test]
fn sampled_answers_match_a_regex() {
    let engine = engine();
    let pattern = r"(red|green|blue) [0-9]{2,4}(\.[0-9])?";
    let full = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
    for seed in 0..12 {
        let constraint = Constraint::Regex(pattern.into());
        let (text, tokens, stats) = run(
            &engine,
            "Write a haiku about snow",
            params(constraint, seed),
        );
        assert!(full.is_match(&text), "seed {seed}: {text:?}");
        assert_eq!(tokens, text, "seed {seed}");
        assert!(stats.finish_reason.is_some());
    }
}

#[test]
fn sampled_answers_are_json_objects() {
    let engine = engine();
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "count"],
        "additionalProperties": false}"#;
    for seed in 0..8 {
        let constraint = Constraint::JsonSchema(schema.into());
        let (text, _, stats) = run(
            &engine,
            "Write a haiku about rain",
            params(constraint, seed),
        );
        if stats.finish_reason == Some(FinishReason::Length) {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        let count = value["count"].as_i64().unwrap();
        assert!((0..=99).contains(&count), "{text}");
        assert!(
            value["name"].as_str().unwrap().chars().count() <= 12,
            "{text}"
        );
        assert_eq!(value.as_object().unwrap().len(), 2, "{text}");
    }
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let engine = engine();
    let grammar = "start: \"The \" ANIMAL \" is \" COLOR \".\"\nANIMAL: \"cat\" | \"dog\" | \"owl\"\nCOLOR: /[a-z]{3,8}/";
    let first = run(
        &engine,
        "Write a haiku about a fox",
        params(Constraint::Lark(grammar.into()), 7),
    );
    let again = run(
        &engine,
        "Write a haiku about a fox",
        params(Constraint::Lark(grammar.into()), 7),
    );
    assert_eq!(first.0, again.0);
    let re = regex::Regex::new(r"^The (cat|dog|owl) is [a-z]{3,8}\.$").unwrap();
    assert!(re.is_match(&first.0), "{:?}", first.0);
    assert_eq!(first.2.finish_reason, Some(FinishReason::Stop));
}

/// Greedy under a constraint the model's own answer satisfies: the same answer as without it.
#[test]
fn a_constraint_the_answer_meets_changes_nothing() {
    let engine = engine();
    let greedy = |constraint| GenerationParams {
        max_tokens: 40,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        constraint,
        ..GenerationParams::default()
    };
    let (plain, _, _) = run(&engine, "Write a haiku about ice hockey", greedy(None));
    let (constrained, _, _) = run(
        &engine,
        "Write a haiku about ice hockey",
        greedy(Some(Constraint::Regex(r"(?s).*".into()))),
    );
    assert_eq!(constrained.trim_start(), plain);
}

/// The error a constraint ends in: at compile time, or (for a lexer that blows up only on
/// the model's text) while generating.
fn grammar_error(engine: &Arc<Engine>, constraint: Constraint) -> String {
    let kind = constraint.kind();
    let mut generation = match engine.generate(
        &Prompt::Text("Write a haiku about snow".into()),
        params(constraint, 5),
    ) {
        Err(Error::Grammar(message)) => return message,
        Err(other) => panic!("not a grammar error: {other}"),
        Ok(generation) => generation,
    };
    loop {
        match generation.step() {
            Err(Error::Grammar(message)) => return message,
            Err(other) => panic!("not a grammar error: {other}"),
            Ok(Event::Finished { .. }) => panic!("a {kind} generated to the end"),
            Ok(_) => {}
        }
    }
}

fn compile_error(engine: &Engine, constraint: Constraint) -> String {
    match engine.grammars().start(&constraint) {
        Err(Error::Grammar(message)) => message,
        Err(other) => panic!("not a grammar error: {other}"),
        Ok(_) => panic!("a {} compiled", constraint.kind()),
    }
}

#[test]
fn hostile_constraints_are_errors_before_any_token() {
    let engine = engine();
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    assert!(compile_error(&engine, Constraint::JsonSchema(deep)).contains("nests"));
    let nested = (0..10_000).fold(r#"{"type":"integer"}"#.to_string(), |inner, _| {
        format!(r#"{{"type":"array","items":{inner}}}"#)
    });
    assert!(compile_error(&engine, Constraint::JsonSchema(nested)).contains("nests"));
    let values: Vec<String> = (0..1_000_000).map(|i| format!("\"v{i}\"")).collect();
    let huge_enum = format!(r#"{{"enum":[{}]}}"#, values.join(","));
    assert!(compile_error(&engine, Constraint::JsonSchema(huge_enum)).contains("bytes"));
    compile_error(
        &engine,
        Constraint::JsonSchema(r#"{"type": "objekt"}"#.into()),
    );
    compile_error(&engine, Constraint::JsonSchema("{\"type\": ".into()));
    compile_error(&engine, Constraint::JsonSchema("[1, 2]".into()));
    compile_error(&engine, Constraint::Regex("(a".into()));
    // Nothing matches these.
    compile_error(
        &engine,
        Constraint::Lark("start: foo\nfoo: foo \"x\"".into()),
    );
    compile_error(
        &engine,
        Constraint::Lark("start: /[^\\x00-\\x{10FFFF}]/".into()),
    );
    compile_error(&engine, Constraint::Regex("[^\\x00-\\x{10FFFF}]".into()));
    // Counted repetitions nested: one lexer step is slow, the step's time limit ends it.
    let message = compile_error(&engine, Constraint::Regex("((a{100}){100}){100}".into()));
    assert!(message.contains("longer than"), "{message}");
    let message = compile_error(
        &engine,
        Constraint::JsonSchema(r#"{"type": "string", "pattern": "^((a{100}){100}){100}$"}"#.into()),
    );
    assert!(message.contains("longer than"), "{message}");
    // A lexer whose states multiply with the text: over its state limit while generating.
    grammar_error(&engine, Constraint::Regex("(x+x+)+y{1000}{1000}".into()));
    // The engine goes on as before.
    let (text, _, _) = run(
        &engine,
        "Write a haiku about snow",
        params(Constraint::Regex("[a-z]+".into()), 1),
    );
    assert!(
        text.chars().all(|c| c.is_ascii_lowercase()) && !text.is_empty(),
        "{text:?}"
    );
}

/// Backtracking engines take exponential time on these; llguidance's derivatives do not.
#[test]
fn regexes_that_backtracking_engines_fear_run_normally() {
    let engine = engine();
    for pattern in [
        r"(a|b)*a(a|b){20}",
        r"(.*a){20}",
        r"(\w+\s?)*",
        r"(.*,){20}z",
    ] {
        let (_, _, stats) = run(
            &engine,
            "Write a haiku about snow",
            params(Constraint::Regex(pattern.into()), 2),
        );
        assert!(stats.generated_tokens > 0, "{pattern}");
    }
}

#[test]
fn nesting_counts_brackets() {
    assert_eq!(nesting("a(b[c]{d})"), 2);
    assert_eq!(nesting("(([{x}]))"), 4);
    assert_eq!(nesting("))(("), 2);
    assert_eq!(nesting(""), 0);
}

/// The per-token cost of the constraint, outside any model, by strategy: the mask at every
/// step, or the sampler's pick checked first (the mask only when it is refused). Logits are
/// noise; with `agree`, a token the constraint allows gets a lead first, as a model that follows
/// the format gives it.
#[test]
#[ignore = "timing: CONSTRAINT_TIMING_GGUF=file cargo test --release --lib constraint_step_timing -- --ignored --nocapture"]
fn constraint_step_timing() {
    use crate::gguf::GgufFile;
    use crate::sampling::Sampler;
    use crate::tokenizer::Tokenizer;
    use rand::{Rng, SeedableRng};
    use std::time::{Duration, Instant};

    let path = std::env::var("CONSTRAINT_TIMING_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| fixture("phi3-vocab.gguf"));
    let gguf = GgufFile::open(&path).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_gguf(gguf.metadata()).unwrap());
    let vocab = tokenizer.vocab_size();
    let grammars = Grammars::new(tokenizer);
    let schema = Constraint::JsonSchema(
        r#"{"type":"object","properties":{"id":{"type":"integer","minimum":0,"maximum":99999},
        "name":{"type":"string","maxLength":24},"role":{"enum":["admin","editor","viewer"]},
        "score":{"type":"number","minimum":0,"maximum":100},"active":{"type":"boolean"},
        "tags":{"type":"array","items":{"type":"string","maxLength":10},"maxItems":4},
        "address":{"type":"object","properties":{"city":{"type":"string","maxLength":20},
        "zip":{"type":"string","pattern":"^[0-9]{5}$"},"country":{"enum":["US","DE","FR","JP"]}},
        "required":["city","zip","country"],"additionalProperties":false}},
        "required":["id","name","role","score","active","tags","address"],
        "additionalProperties":false}"#
            .into(),
    );
    eprintln!("{} ({vocab} tokens)", path.display());
    let start = Instant::now();
    grammars.start(&Constraint::Regex("a".into())).unwrap();
    eprintln!(
        "trie and factory: {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    for variant in 0..3 {
        let Constraint::JsonSchema(text) = &schema else {
            unreachable!()
        };
        let fresh =
            Constraint::JsonSchema(text.replacen('{', &format!("{{\"title\":\"{variant}\","), 1));
        let start = Instant::now();
        grammars.start(&fresh).unwrap();
        eprintln!(
            "schema compile: {:.1} ms",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    for agree in [true, false] {
        for mask_first in [true, false] {
            let (mut spent, mut tokens, mut masks) = (Duration::ZERO, 0usize, 0usize);
            for seed in 0..6u64 {
                let mut state = grammars.start(&schema).unwrap();
                let mut sampler = Sampler::new(SamplingParams {
                    temperature: 1.0,
                    seed: Some(seed),
                    ..SamplingParams::default()
                });
                let mut noise = rand::rngs::StdRng::seed_from_u64(seed);
                let mut logits = vec![0f32; vocab];
                while !state.is_complete() && tokens < 2_000 {
                    logits
                        .iter_mut()
                        .for_each(|l| *l = noise.random::<f32>() * 4.0);
                    if agree {
                        let ahead = state.fork().mask().unwrap();
                        let allowed: Vec<u32> =
                            (0..vocab as u32).filter(|&t| ahead.allows(t)).collect();
                        let pick = allowed[noise.random_range(0..allowed.len())];
                        logits[pick as usize] += 20.0;
                    }
                    let start = Instant::now();
                    let mut id = if mask_first {
                        None
                    } else {
                        sampler.propose(&mut logits, &[], None)
                    };
                    if !matches!(id, Some(first) if state.allows(first).unwrap()) {
                        let mask = state.mask().unwrap();
                        masks += 1;
                        id = sampler.propose(&mut logits, &[], Some(&|t| mask.allows(t)));
                    }
                    let id = id.unwrap();
                    sampler.accept(id);
                    state.advance(id).unwrap();
                    spent += start.elapsed();
                    tokens += 1;
                    if ends_the_text(&state, id) {
                        break;
                    }
                }
            }
            let mut baseline = Sampler::new(SamplingParams::default());
            let mut logits = vec![0f32; vocab];
            let start = Instant::now();
            for _ in 0..200 {
                baseline.sample(&mut logits, &[]);
            }
            let sample_us = start.elapsed().as_secs_f64() * 1e6 / 200.0;
            eprintln!(
                "(sampling alone {sample_us:.0} us) model agrees: {agree:5}, {:12}: {:7.1} us/token over {tokens} tokens, mask on {:.0} %",
                if mask_first { "mask first" } else { "sample first" },
                spent.as_secs_f64() * 1e6 / tokens as f64,
                100.0 * masks as f64 / tokens as f64
            );
        }
    }
}

/// A stop token ends the text (the constraint allowed it, so the constraint was complete).
fn ends_the_text(state: &ConstraintState, id: u32) -> bool {
    state.ends.contains(&id)
}
