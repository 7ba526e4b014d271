//! Chat templates: a conversation rendered into the prompt text the model was trained on.
//!
//! The template comes from the GGUF file (`tokenizer.chat_template`), so it is untrusted input.
//! It is rendered with minijinja, which has no way to reach the filesystem (no loader is set) or
//! to run code, under these bounds: minijinja's fuel (one budget for instructions executed and
//! bytes of data created), a recursion limit, a limit on the output size, and the guards of
//! [`guard`]: no value bigger than a limit or nested deeper than 64, whatever walks it, and a
//! deadline for the work fuel does not pay for.
//!
//! Rendering follows Hugging Face transformers' `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, no auto-escaping, lenient undefined values, the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`, the functions `raise_exception` and
//! `strftime_now`, and Python's string/dict methods (`.strip()`, `.startswith()`, `.items()`...)
//! via minijinja-contrib's `pycompat`.

mod guard;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use minijinja::machinery::{self, CompiledTemplate, Instructions, TemplateConfig};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{context, AutoEscape, Environment, ErrorKind, UndefinedBehavior};

use crate::{Error, Result};

/// Phi-3-mini-4k-instruct's template (its `tokenizer_config.json` on the hub, which the Phi-3
/// GGUF files converted from it carry): `<|{role}|>\n{content}<|end|>\n` for system, user and
/// assistant messages, then `<|assistant|>\n` for the generation prompt, else the EOS token.
pub const PHI3_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}\
{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}\
{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}\
{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// Fuel for a render with no messages: minijinja charges one fuel per instruction and one per
/// 64 bytes of data, so this allows 200k instructions or about 13 MB of data.
const BASE_FUEL: u64 = 200_000;
/// Extra fuel per message: real templates run a few dozen instructions per message.
const FUEL_PER_MESSAGE: u64 = 1_000;
/// Extra fuel per byte of message text: 1/4 fuel, i.e. each byte may be copied ~16 times
/// (stripped, concatenated, captured, written) before the budget runs out.
const MESSAGE_BYTES_PER_FUEL: u64 = 4;

/// The output may be this much plus twice the size of the messages.
const BASE_OUTPUT_LIMIT: usize = 1 << 20;

/// No value may expand to more than this plus four times the messages (their text and, per
/// message, [`MESSAGE_VALUE_BYTES`] for the map holding it): a list of all the messages, or a
/// few copies of one, fits; what a render may walk or copy in one step is bounded by it.
const BASE_VALUE_LIMIT: u64 = 8 << 20;
const MESSAGE_VALUE_BYTES: u64 = 256;

/// Comparisons and hashing are not charged fuel; this bounds the time they can take. Real
/// templates render in milliseconds.
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// Chat templates hardly recurse (macros rendering nested JSON schemas do, a few levels).
/// minijinja's own cap is 500, which a 2 MiB thread stack (Rust's default for spawned threads)
/// may not survive in a debug build.
const RECURSION_LIMIT: usize = 100;

/// Real chat templates are a few kilobytes; compiling one costs memory and time in proportion
/// to its size (tens of bytes of code per byte), on every render.
const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// Error messages quote template-made text (`raise_exception`); keep them readable.
const MAX_ERROR_CHARS: usize = 1_000;

/// The roles a message may have: the ones the Phi models' templates render. (Their templates
/// skip a `tool` message without a word, so phi3 refuses one rather than answer as if the
/// tool's output had been read.)
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Each message's role is one of [`ROLES`].
fn check_roles(messages: &[Message]) -> Result<()> {
    match messages
        .iter()
        .position(|m| !ROLES.contains(&m.role.as_str()))
    {
        None => Ok(()),
        Some(i) => Err(Error::invalid_argument(format!(
            "messages[{i}]['role'] is '{}'; expected one of {}",
            messages[i].role.escape_debug(),
            ROLES.join(", ")
        ))),
    }
}

/// A chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    config: TemplateConfig,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error or an unsupported construct (for instance the
    /// transformers-only `{% generation %}` tag) is an [`Error::ChatTemplate`].
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(Error::ChatTemplate(format!(
                "the chat template is {} bytes long, over the limit of {MAX_TEMPLATE_BYTES}",
                source.len()
            )));
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_recursion_limit(RECURSION_LIMIT);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // It prints the whole state: nothing a chat template needs.
        env.remove_global("debug");
        guard::add_bounded_filters(&mut env);
        let config = TemplateConfig {
            syntax_config: SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| template_error("configuring the template syntax", &e))?,
            default_auto_escape: Arc::new(|_| AutoEscape::None),
        };
        let template = Self {
            env,
            config,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        guard::check_constant_folding(source, template.config.syntax_config.clone())
            .map_err(|e| template_error("compiling the chat template", &e))?;
        template.compile()?;
        Ok(template)
    }

    /// The template's code with its guards, and its blocks likewise. Compiled for each render:
    /// the code borrows the source, so it cannot be kept beside it (compiling takes
    /// microseconds).
    fn compile(&self) -> Result<GuardedCode<'_>> {
        let compiled = CompiledTemplate::new(TEMPLATE_NAME, &self.source, &self.config)
            .map_err(|e| template_error("compiling the chat template", &e))?;
        let instrument = |code| {
            guard::instrument(code).map_err(|e| template_error("compiling the chat template", &e))
        };
        let blocks = compiled
            .blocks
            .iter()
            .map(|(name, code)| Ok((*name, instrument(code)?)))
            .collect::<Result<_>>()?;
        Ok(GuardedCode {
            code: instrument(&compiled.instructions)?,
            blocks,
        })
    }

    /// [`PHI3_TEMPLATE`], for GGUF files without `tokenizer.chat_template`.
    pub fn phi3_default(bos_token: &str, eos_token: &str) -> Self {
        // A constant that a unit test compiles: this cannot fail.
        Self::new(PHI3_TEMPLATE, bos_token, eos_token).expect("the built-in template compiles")
    }

    #[cfg(test)]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation. The text never starts with the BOS token: the tokenizer adds
    /// it (`add_bos`), so a template's own leading `{{ bos_token }}` is dropped here rather than
    /// becoming a second BOS.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        check_roles(messages)?;
        let message_bytes: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        let fuel = BASE_FUEL
            .saturating_add(FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64))
            .saturating_add(message_bytes as u64 / MESSAGE_BYTES_PER_FUEL);
        let output_limit = BASE_OUTPUT_LIMIT.saturating_add(message_bytes.saturating_mul(2));
        let value_limit = BASE_VALUE_LIMIT.saturating_add(
            (message_bytes as u64)
                .saturating_add(MESSAGE_VALUE_BYTES.saturating_mul(messages.len() as u64))
                .saturating_mul(4),
        );

        let guarded = self.compile()?;
        // Fuel and the guards' limits are settings of the environment; a clone is cheap.
        let mut env = self.env.clone();
        env.set_fuel(Some(fuel));
        guard::install(&mut env, value_limit, TIME_LIMIT);
        let ctx = context! {
            messages => Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        // The output grows by at most what fuel pays for (a byte per 1/64 fuel) plus one
        // guarded value per step; its limit is checked at the end.
        let mut text = String::new();
        let result = machinery::eval(
            &env,
            &guarded.code,
            ctx,
            &guarded.blocks,
            &mut machinery::make_string_output(&mut text),
            AutoEscape::None,
        );
        let output_error = || {
            Error::ChatTemplate(format!(
                "rendering the chat template: the output exceeds its limit of {output_limit} \
                 bytes (1 MiB plus twice the size of the messages)"
            ))
        };
        if let Err(e) = result {
            return Err(if text.len() > output_limit {
                output_error()
            } else if e.kind() == ErrorKind::OutOfFuel {
                Error::ChatTemplate(format!(
                    "rendering the chat template: it used up its budget of {fuel} fuel \
                     (instructions and data it creates); it loops or builds data without bound"
                ))
            } else {
                template_error("rendering the chat template", &e)
            });
        }
        if text.len() > output_limit {
            return Err(output_error());
        }
        Ok(match text.strip_prefix(self.bos_token.as_str()) {
            Some(rest) if !self.bos_token.is_empty() => rest.to_string(),
            _ => text,
        })
    }
}

/// A template's instrumented code, borrowing its source.
struct GuardedCode<'s> {
    code: Instructions<'s>,
    blocks: BTreeMap<&'s str, Instructions<'s>>,
}

/// `Error::ChatTemplate` from a minijinja error, its causes included, at a readable length.
fn template_error(doing: &str, err: &minijinja::Error) -> Error {
    let mut msg = format!("{doing}: {err}");
    // The root cause says what went wrong; the links between (one per nested include) repeat
    // where.
    let mut root = None;
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        root = Some(cause);
        source = cause.source();
    }
    if let Some(root) = root {
        msg.push_str(&format!(": {root}"));
    }
    if msg.chars().count() > MAX_ERROR_CHARS {
        msg = msg.chars().take(MAX_ERROR_CHARS).collect::<String>() + "...";
    }
    Error::ChatTemplate(msg)
}

/// transformers' `raise_exception(message)`: templates call it to refuse a conversation
/// (say, roles that do not alternate).
fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {message}"),
    ))
}

/// transformers' `strftime_now(format)`, in UTC: transformers uses local time, but finding the
/// local time zone needs a time zone database; templates use it for "today's date" lines.
fn strftime_now(format: &str) -> std::result::Result<String, minijinja::Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    strftime(format, i64::try_from(now).unwrap_or(i64::MAX))
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// C's strftime for the UTC time `unix_secs`, with the directives date lines use. `%-d` and
/// friends drop the zero padding, as glibc (and so Python on Linux) does.
fn strftime(format: &str, unix_secs: i64) -> std::result::Result<String, minijinja::Error> {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut directive = chars.next();
        let pad = directive != Some('-');
        if !pad {
            directive = chars.next();
        }
        let num = |value: i64, width: usize| {
            if pad {
                format!("{value:0width$}")
            } else {
                value.to_string()
            }
        };
        let piece = match directive {
            Some('Y') => year.to_string(),
            Some('y') => num(year.rem_euclid(100), 2),
            Some('m') => num(month, 2),
            Some('d') => num(day, 2),
            Some('e') => format!("{day:2}"),
            Some('H') => num(hour, 2),
            Some('I') => num(hour12, 2),
            Some('M') => num(minute, 2),
            Some('S') => num(second, 2),
            Some('j') => num(day_of_year, 3),
            Some('p') => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            Some('a') => WEEKDAYS[weekday][..3].to_string(),
            Some('A') => WEEKDAYS[weekday].to_string(),
            Some('b') | Some('h') => month_name[..3].to_string(),
            Some('B') => month_name.to_string(),
            Some('F') => format!("{year:04}-{month:02}-{day:02}"),
            Some('T') => format!("{hour:02}:{minute:02}:{second:02}"),
            Some('Z') => "UTC".to_string(),
            Some('z') => "+0000".to_string(),
            Some('%') if pad => "%".to_string(),
            other => {
                let shown = other.map_or(String::new(), String::from);
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}{shown}",
                        if pad { "" } else { "-" }
                    ),
                ));
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// Year, month (1-12), day (1-31) of the day `days` after 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{names, GgufFile};
    use crate::test_support::peak_allocation;

    const BOS: &str = "<s>";
    const EOS: &str = "<|endoftext|>";

    fn fixture(name: &str) -> String {
        format!("{}/../shared/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn gguf_template(gguf: &str) -> ChatTemplate {
        let file = GgufFile::open(fixture(gguf)).unwrap();
        let source = file
            .metadata()
            .str(names::tokenizer::CHAT_TEMPLATE)
            .unwrap();
        ChatTemplate::new(source, BOS, EOS).unwrap()
    }

    fn user(content: &str) -> Vec<Message> {
        vec![Message::new("user", content)]
    }

    fn render(source: &str, messages: &[Message]) -> Result<String> {
        ChatTemplate::new(source, BOS, EOS)?.render(messages, true)
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn renders_the_fixture_prompts_exactly() {
        for model in [
            "tiny-phi3-haiku-q4_k_m",
            "tiny-phi35-longrope-q4_k_m",
            "tiny-phi4mini-gqa-partial-tied-q4_k_m",
        ] {
            let template = gguf_template(&format!("{model}.gguf"));
            // The built-in default is the template these files carry.
            assert_eq!(template.source(), PHI3_TEMPLATE, "{model}");
            let default = ChatTemplate::phi3_default(BOS, EOS);

            let json = std::fs::read_to_string(fixture(&format!("{model}.llamacpp.json"))).unwrap();
            let json: serde_json::Value = serde_json::from_str(&json).unwrap();
            let mut checked = 0;
            for case in json["cases"].as_array().unwrap() {
                let messages = if let Some(text) = case["text"].as_str() {
                    user(text)
                } else if let Some(list) = case["messages"].as_array() {
                    list.iter()
                        .map(|m| {
                            Message::new(
                                m["role"].as_str().unwrap(),
                                m["content"].as_str().unwrap(),
                            )
                        })
                        .collect()
                } else {
                    continue;
                };
                let expected = case["prompt_text"].as_str().unwrap();
                let name = case["name"].as_str().unwrap();
                assert_eq!(
                    template.render(&messages, true).unwrap(),
                    expected,
                    "{model} {name}"
                );
                assert_eq!(
                    default.render(&messages, true).unwrap(),
                    expected,
                    "{model} {name}"
                );
                // llama.cpp's prompt text has no "<s>": its prompt_ids get the BOS (id 1) from
                // the tokenizer, as phi3's will.
                assert!(!expected.starts_with(BOS));
                assert_eq!(case["prompt_ids"][0].as_u64(), Some(1), "{model} {name}");
                checked += 1;
            }
            assert!(checked >= 5, "{model}: only {checked} cases");
        }
    }

    #[test]
    fn default_template_without_generation_prompt_ends_with_eos() {
        let messages = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello."),
        ];
        let text = ChatTemplate::phi3_default(BOS, EOS)
            .render(&messages, false)
            .unwrap();
        assert_eq!(
            text,
            "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n\
             <|endoftext|>"
        );
    }

    #[test]
    fn phi3_vocab_template_loses_its_leading_bos() {
        // The original Phi-3-mini-4k-instruct template: BOS first, no system role, and the
        // generation prompt after every user message whatever add_generation_prompt says.
        let template = gguf_template("phi3-vocab.gguf");
        assert!(template.source().starts_with("{{ bos_token }}"));
        let messages = vec![
            Message::new("system", "ignored"),
            Message::new("user", "Hi"),
        ];
        let expected = "<|user|>\nHi<|end|>\n<|assistant|>\n";
        assert_eq!(template.render(&messages, true).unwrap(), expected);
        assert_eq!(template.render(&messages, false).unwrap(), expected);
        // Only the BOS that opens the text goes.
        let inner = render("{{ bos_token }}x{{ bos_token }}", &[]).unwrap();
        assert_eq!(inner, "x<s>");
    }

    #[test]
    fn huggingface_jinja_features() {
        let messages = vec![
            Message::new("system", "  sys  "),
            Message::new("user", "Hello World"),
        ];
        // trim_blocks and lstrip_blocks: block tags leave no newlines or indentation behind.
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m['content'] }}]\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(render(source, &messages).unwrap(), "[Hello World]\n");
        // Python string and dict methods, namespaces, loop variables, tests, filters.
        let source = "{{ messages[0].content.strip() }}|{{ messages[1].content.startswith('Hello') }}\
            |{{ messages[1].content.lower().split(' ') | join(',') }}\
            |{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}\
            |{{ messages | length }}|{{ messages[0]['content'] is string }}\
            |{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}\
            |{{ messages[0].content | trim }}|{{ (messages | last).role }}\
            |{{ '<&>' }}|{{ undefined_thing }}|{{ 'x' if add_generation_prompt }}";
        assert_eq!(
            render(source, &messages).unwrap(),
            "sys|True|hello,world|2|2|True|a=1|sys|user|<&>||x"
        );
        // Loop controls.
        let source =
            "{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}";
        assert_eq!(render(source, &[]).unwrap(), "012");
    }

    /// Phi-3.5-mini-instruct's template (its `tokenizer_config.json`): a system message only
    /// when it has content.
    const PHI35_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}\
{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}\
{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}\
{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

    /// Phi-4-mini-instruct's template: no newlines, any role, tools in the system message.
    const PHI4_MINI_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}\
{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}\
{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}";

    #[test]
    fn renders_the_phi_family_templates() {
        let messages = vec![
            Message::new("system", ""),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello."),
            Message::new("user", "Write a haiku"),
        ];
        assert_eq!(
            render(PHI35_TEMPLATE, &messages).unwrap(),
            "<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nWrite a haiku<|end|>\n\
             <|assistant|>\n"
        );
        assert_eq!(
            render(PHI4_MINI_TEMPLATE, &messages).unwrap(),
            "<|system|><|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>Write a haiku\
             <|end|><|assistant|>"
        );
    }

    /// How phi3 rendered before its guards: minijinja with the same settings and functions,
    /// nothing instrumented.
    fn render_unguarded(source: &str, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .unwrap(),
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template(TEMPLATE_NAME, source).unwrap();
        let ctx = context! {
            messages => Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => BOS,
            eos_token => EOS,
        };
        let text = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(ctx)
            .unwrap();
        text.strip_prefix(BOS).map_or(text.clone(), str::to_string)
    }

    /// The guards change nothing a template that stays within its limits renders: the Phi
    /// family's templates, and templates using what guards touch (lists, maps, lazy sequences,
    /// namespaces, macros, filters, methods, formatting, loops).
    #[test]
    fn guards_change_no_output() {
        let fixture = gguf_template("phi3-vocab.gguf");
        let mut sources = vec![
            PHI3_TEMPLATE,
            fixture.source(),
            PHI35_TEMPLATE,
            PHI4_MINI_TEMPLATE,
            "{% set ns = namespace(roles=[], text='', n=0) %}{% for m in messages %}\
             {% set ns.roles = ns.roles + [m.role] %}{% set ns.text = ns.text ~ m.content[:3] %}\
             {% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.roles|join(',') }}|{{ ns.text }}|{{ ns.n }}|{{ ns }}",
            "{% for g in messages|groupby('role') %}{{ g.grouper }}={{ g.list|length }}{{ g }};{% endfor %}",
            "{{ messages|map(attribute='role')|unique|list }}|{{ messages|tojson }}\
             |{{ {'b': 1, 'a': [1, 2, (3, 4)]}|tojson(indent=2) }}|{{ messages|first|items|list }}",
            "{{ messages[0] }}|{{ messages[0].items()|list }}|{{ dict(a=1, b=messages|length) }}\
             |{{ range(5)|list }}|{{ range(3) }}|{{ messages[0]|dictsort }}",
            "{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|map('upper')|join(' / ') }}\
             |{{ messages|select }}|{{ (messages|map(attribute='role'))[0] }}|{{ messages|reverse }}",
            "{{ messages[1:] }}|{{ messages[::-1]|map(attribute='role')|list }}|{{ messages[1:] is sequence }}\
             |{{ messages[1:][0] }}|{{ (messages|reverse) is sequence }}|{{ 'abc'[1:] }}",
            "{{ [1, 2] + [3] }}|{{ ([1, 2] + [3])[1] }}|{{ ([1, 2] + [3]) is sequence }}|{{ [0] * 3 }}\
             |{{ (1, 2) + (3,) }}|{{ 'ab' * 3 }}|{{ {'a': 1}|chain({'b': 2}) }}|{{ [1]|chain([2], [3]) }}\
             |{{ ([1]|chain([2])) is sequence }}|{{ messages|zip([1, 2])|list }}",
            "{{ '%s-%05d'|format('x', 42) }}|{{ '{}:{:>6}'.format('k', 'v') }}|{{ messages|length > 1 and messages[-1].role }}\
             |{% for k, v in {'x': 1, 'y': 2}|dictsort %}{{ k }}{{ v }}{% endfor %}|{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}",
            "{% macro row(a, b='d') %}<{{ a }}{{ b }}>{% endmacro %}{{ row(1) }}{{ row(1, 2) }}{{ row(*[3, 4]) }}{{ row(**{'a': 5}) }}\
             {% macro box() %}[{{ caller(7) }}]{% endmacro %}{% call(x) box() %}{{ x }}{% endcall %}",
            "{% set x %}captured {{ messages|length }}{% endset %}{{ x|trim }}\
             {% for m in messages %}{{ loop.index }}{{ loop.cycle('a', 'b') }}{% if loop.changed(m.role) %}!{% endif %}\
             {{ loop.previtem.role if loop.previtem else '-' }}{{ loop.length }}{% endfor %}\
             {% filter upper %}shout {{ messages[0].role }}{% endfilter %}|{{ messages|batch(2)|list }}|{{ messages|slice(2)|list }}",
            "{{ messages|sort(attribute='role')|map(attribute='role')|list }}|{{ messages|map(attribute='content')|max }}\
             |{% set a, b = (messages + messages)[:2] %}{{ b.role }}|{{ messages|list == messages }}|{{ 'user' in messages|map(attribute='role') }}",
        ];
        let sources_of_other_tests = [
            "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m['content'] }}]\n    {% endif %}\n{% endfor %}\n",
            "{{ messages[0].content.strip() }}|{{ messages[-1].content.lower().split(' ') | join(',') }}\
             |{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ '<&>' }}|{{ undefined_thing }}",
            "{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}",
        ];
        sources.extend(sources_of_other_tests);
        let conversations = [
            user("Write a haiku about ice hockey"),
            vec![
                Message::new("system", "  Be brief. "),
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello. ✨"),
                Message::new("user", "Écris un haïku"),
            ],
            vec![Message::new("user", ""), Message::new("assistant", "")],
        ];
        for source in sources {
            for messages in &conversations {
                for add_generation_prompt in [true, false] {
                    let guarded = ChatTemplate::new(source, BOS, EOS)
                        .and_then(|t| t.render(messages, add_generation_prompt))
                        .unwrap_or_else(|e| panic!("{source}: {e}"));
                    assert_eq!(
                        guarded,
                        render_unguarded(source, messages, add_generation_prompt),
                        "{source}"
                    );
                }
            }
        }
    }

    #[test]
    fn raise_exception_is_a_chat_template_error() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok";
        assert_eq!(render(source, &user("hi")).unwrap(), "ok");
        let err = render(source, &[Message::new("assistant", "hi")]).unwrap_err();
        match err {
            Error::ChatTemplate(msg) => assert!(msg.contains("roles must alternate"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strftime_now_formats_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %j %a %A %b %B %y %I%p %e|%-d %-m %F %T %Z %%", t).unwrap(),
            "2024-02-29 13:05:09 060 Thu Thursday Feb February 24 01PM 29|29 2 2024-02-29 13:05:09 UTC %"
        );
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(
            strftime("%-d %B %Y, %A", 951_782_400).unwrap(),
            "29 February 2000, Tuesday"
        );
        assert_eq!(strftime("%Y-%m-%d", -86_400).unwrap(), "1969-12-31");
        assert!(strftime("%Q", t).is_err());
        assert!(strftime("100%", t).is_err());
        // Through the template: today's year, whatever it is.
        let year = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert!(year.len() == 4 && year.starts_with('2'), "{year}");
    }

    #[test]
    fn syntax_errors_are_chat_template_errors() {
        for source in [
            "{% for m in messages %}",
            "{{ }",
            "{% generation %}x{% endgeneration %}",
        ] {
            match ChatTemplate::new(source, BOS, EOS) {
                Err(Error::ChatTemplate(msg)) => assert!(msg.contains("compiling"), "{msg}"),
                other => panic!("{source:?}: {other:?}"),
            }
        }
    }

    /// Templates that try to make the render take memory, stack or time out of proportion to
    /// its fuel, each with a word of the error it must fail with.
    const HOSTILE: &[(&str, &str)] = &[
        // Huge values in one step.
        ("{{ 'a' * 10**9 }}", "fuel"),
        ("{% set x = 'a' * 10**9 %}", "fuel"),
        ("{% set n = 10**8 %}{{ [0] * n }}", "more than"),
        ("{% set n = 10**8 %}{% set a, b = [0] * n %}", "more than"),
        ("{% set n = 10**8 %}{{ ([0] * n)|string|length }}", "more than"),
        ("{% set n = 10**8 %}{{ (0,) * n }}", "fuel"),
        ("{{ range(10**9) | list }}", "range"),
        ("{{ [1]|batch(10**8, 0) }}", "fuel"),
        ("{{ ('x\n' * 1000)|indent(10**6) }}", "fuel"),
        ("{{ ('a' * 100000)|replace('a', 'b' * 100000) }}", "fuel"),
        ("{{ [1]|tojson(indent=10**9) }}", "indent"),
        ("{{ '{:>1000000000}'.format('x') }}", "format"),
        ("{{ '{:{}}'.format('x', 10**9) }}", "format"),
        ("{% set s = 'x' * 1000000 %}{{ '%(a)s%(a)s%(a)s'|format(a=s) }}", "format"),
        ("{% set s = 'x' * 1000000 %}{{ '{0}{0}{0}'.format(s) }}", "format"),
        // ... and folded into constants while compiling.
        ("{{ [0] * 10**8 }}", "constant"),
        ("{{ [0]*10**8 + [0]*10**8 + [0]*10**8 }}", "constant"),
        ("{% if [0]*10**8 == [0]*10**8 %}{% endif %}", "constant"),
        ("{{ [[0] * 1000] * 1000 }}", "more than"),
        // Doubling: small steps, exponential data.
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "fuel"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}", "fuel"),
        ("{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}", "more than"),
        ("{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}", "more than"),
        ("{% set ns = namespace(x={}) %}{% for i in range(64) %}{% set ns.x = {'a': ns.x, 'b': ns.x} %}{% endfor %}", "more than"),
        ("{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = dict(a=ns.x, b=ns.x) %}{% endfor %}", "more than"),
        ("{% set ns = namespace(x=[1]) %}{% for i in range(64) %}{% set ns.x = ns.x * 2 %}{% endfor %}", "more than"),
        // Many copies of one value.
        ("{% set s = 'x' * 1000000 %}{{ ([s] * 100)|join }}", "more than"),
        ("{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s]|tojson }}", "more than"),
        ("{% macro m() %}{{ varargs|length }}{% endmacro %}{% set s = 'x' * 1000000 %}{{ m(s, s, s, s, s, s, s, s, s, s) }}", "more than"),
        // Nesting too deep to walk or drop.
        ("{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}", "deep"),
        ("{% set ns = namespace(x=[1]) %}{% for i in range(100000) %}{% set ns.x = ns.x[0:] %}{% endfor %}{{ ns.x }}", "fuel"),
        ("{% set ns = namespace(x={}) %}{% for i in range(100000) %}{% set ns.x = ns.x|chain({}) %}{% endfor %}{{ ns.x }}", "fuel"),
        ("{% set ns = namespace(x=[1]) %}{% for i in range(100000) %}{% set ns.x = ns.x|select %}{% endfor %}{{ ns.x }}", "fuel"),
        // A namespace holding itself, or shared where growing it would grow what holds it.
        ("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}", "namespace"),
        ("{% set ns = namespace() %}{% set l = [ns] * 1000 %}", "namespace"),
        ("{% set ns = namespace() %}{% set v = ns|chain({}) %}{% set ns.v = v %}{{ ns }}", "namespace"),
        ("{% set ns = namespace() %}{% set ns.i = ns.items() %}", "namespace"),
        // Work that fuel does not pay for.
        ("{% set a = ['x' * 100000] * 40 %}{% set b = ['x' * 100000] * 40 %}{% for i in range(100000) %}{% if [a] == [b] %}{% endif %}{% endfor %}", "fuel"),
        // Long loops.
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "fuel"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}", ""),
        // Output far past the limit.
        ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output"),
        // Recursion: macros, recursive loops.
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
        ("{% for m in [[1]] recursive %}{{ loop([m]) }}{% endfor %}", "recursion"),
        // No other templates, so no filesystem either.
        ("{% include 'chat_template' %}", "not supported"),
        ("{% include '/etc/passwd' %}", "not supported"),
        ("{% extends '../Cargo.toml' %}", "not supported"),
        ("{% import 'x' as y %}", "not supported"),
    ];

    /// Each hostile template fails with `Error::ChatTemplate` from the limit that names it
    /// (fuel, size, a refused feature), holding a few megabytes at most. The limits count work,
    /// not time, so the test asserts no speed.
    #[test]
    fn hostile_templates_fail_quickly_and_small() {
        for (source, needle) in HOSTILE {
            let (result, peak) = peak_allocation(|| render(source, &user("hi")));
            match result {
                Err(Error::ChatTemplate(msg)) => {
                    assert!(msg.contains(needle), "{source}: {needle:?} not in {msg:?}")
                }
                other => panic!("{source}: expected a chat template error, got {other:?}"),
            }
            assert!(peak < 64 << 20, "{source} held {} MiB", peak >> 20);
        }
    }

    #[test]
    fn oversized_templates_are_refused() {
        let source = "{{ messages[0].content }}".repeat(MAX_TEMPLATE_BYTES / 20);
        match ChatTemplate::new(&source, BOS, EOS) {
            Err(Error::ChatTemplate(msg)) => assert!(msg.contains("over the limit"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn python_internals_are_out_of_reach() {
        for source in [
            "{{ ''.__class__ }}",
            "{{ messages.__class__ }}",
            "{{ range.__globals__ }}",
            "{{ raise_exception.__code__ }}",
            "{{ ''.__class__.__mro__[1].__subclasses__() }}",
            "{{ self }}",
            "{{ cycler.__init__.__globals__.os }}",
        ] {
            // Undefined prints as nothing; going further into it is an error. Nothing leaks.
            match render(source, &user("hi")) {
                Ok(text) => assert_eq!(text, "", "{source}"),
                Err(Error::ChatTemplate(_)) => {}
                Err(other) => panic!("{source}: {other:?}"),
            }
        }
    }

    #[test]
    fn large_conversations_fit_the_budgets() {
        // 2,000 messages, 4 MB of text: the budgets grow with the input.
        let long = "word ".repeat(400);
        let messages: Vec<Message> = (0..2000)
            .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, long.clone()))
            .collect();
        let text = ChatTemplate::phi3_default(BOS, EOS)
            .render(&messages, true)
            .unwrap();
        assert!(text.len() > 2000 * long.len());
    }
}
