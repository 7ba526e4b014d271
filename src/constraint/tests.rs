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
