//! Bounded versions of the filters and methods that could make a huge value in one step: fuel
//! is charged for a filter's output only once it exists, so their arguments are checked before
//! they run (see [`add_bounded_filters`]).

use minijinja::value::{Kwargs, Rest, ValueKind, ValueOrKwargs};
use minijinja::{Environment, Error, ErrorKind, State, Value};

use super::{pairs, ValueMap};

/// The widest `tojson` indentation: each line is indented by it times its depth.
const MAX_JSON_INDENT: i64 = 8;

/// minijinja charges this many fuel units (1/64 fuel) per byte of serialized output.
const SERIALIZED_UNITS_PER_BYTE: usize = 16;

/// Output a formatting call may add beyond its format string and twice its arguments.
const FORMAT_SLACK: usize = 64 << 10;

/// Replaces the filters and methods whose result can outgrow their arguments many times over
/// in one step, before fuel is charged for it (`tojson`'s indentation, format strings that
/// repeat an argument or ask for a wide field), and `chain`, whose chained maps are views that
/// can be chained again without end.
pub(in crate::chat_template) fn add_bounded_filters(env: &mut Environment<'_>) {
    env.add_filter("tojson", tojson);
    env.add_filter("format", printf_format);
    env.add_filter("chain", chain);
    env.set_unknown_method_callback(|state, value, method, args| {
        if let (Some(format), "format") = (value.as_str(), method) {
            check_format(format, Style::StrFormat, args)?;
        }
        minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
    });
}

fn tojson(
    state: &State<'_, '_>,
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let requested = match &indent {
        Some(indent) => Some(indent.clone()),
        None => kwargs.peek::<Option<Value>>("indent")?,
    };
    // `indent=true` means 2; other values are widths, refused by minijinja if not numbers.
    if let Some(width) = requested.filter(|v| v.is_number()).and_then(|v| v.as_i64()) {
        if width > MAX_JSON_INDENT {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: the indent can be at most {MAX_JSON_INDENT}"),
            ));
        }
    }
    let json = minijinja::filters::tojson(value, indent, kwargs)?;
    let bytes = json.as_str().map_or(0, str::len);
    state.consume_fuel((bytes * SERIALIZED_UNITS_PER_BYTE / 64) as u64)?;
    Ok(json)
}

/// `chain` with maps made into one map at once: the same keys (sorted) and values (the last
/// defined one) as minijinja's chained view.
fn chain(state: &State<'_, '_>, value: Value, others: Rest<Value>) -> Result<Value, Error> {
    if value.kind() != ValueKind::Map || others.iter().any(|v| v.kind() != ValueKind::Map) {
        return minijinja::filters::chain(state, value, others);
    }
    let mut merged = ValueMap::new();
    for map in std::iter::once(&value).chain(others.iter()) {
        for (key, item) in pairs(map)? {
            if !item.is_undefined() || !merged.contains_key(&key) {
                merged.insert(key, item);
            }
        }
    }
    Ok(Value::from_object(merged))
}

fn printf_format(
    state: &mut State<'_, '_>,
    format: &Value,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, Error> {
    if let Some(string) = format.as_str() {
        let values: Vec<Value> = args.iter().map(|a| a.clone().into_value()).collect();
        check_format(string, Style::Printf, &values)?;
    }
    minijinja::filters::format(state, format, args)
}

#[derive(Clone, Copy)]
enum Style {
    /// `"%s"|format(x)`: minijinja checks widths itself.
    Printf,
    /// `"{}".format(x)` (Python's `str.format`).
    StrFormat,
}

/// Refuses a format string whose output could be far bigger than its inputs: every field may
/// print the longest argument (fields can name the same argument again and again), padded to
/// the widest width asked for; a width or precision taken from an argument (`{:{}}`) is
/// refused outright.
fn check_format(format: &str, style: Style, args: &[Value]) -> Result<(), Error> {
    let refuse = |why: &str| Err(Error::new(ErrorKind::InvalidOperation, why.to_string()));
    let bytes = format.as_bytes();
    let (mut fields, mut width) = (0usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        match (style, bytes[i]) {
            (Style::Printf, b'%') | (Style::StrFormat, b'{')
                if bytes.get(i + 1) == Some(&bytes[i]) =>
            {
                i += 2;
                continue;
            }
            (Style::Printf, b'%') => fields += 1,
            (Style::StrFormat, b'{') => {
                fields += 1;
                let field = &format[i + 1..];
                let end = field.find('}').unwrap_or(field.len());
                let field = &field[..end];
                if field.contains('{') {
                    return refuse(
                        "str.format: widths and precisions taken from arguments are not supported",
                    );
                }
                let spec = field.split_once(':').map_or("", |(_, spec)| spec);
                for digits in spec.split(|c: char| !c.is_ascii_digit()) {
                    width = width.max(digits.parse().unwrap_or(if digits.is_empty() {
                        0
                    } else {
                        usize::MAX
                    }));
                }
                i += 1 + end;
            }
            _ => {}
        }
        i += 1;
    }
    let lengths: Vec<usize> = args
        .iter()
        .map(|a| a.as_str().map_or_else(|| a.to_string().len(), str::len))
        .collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let most = fields
        .saturating_mul(longest.saturating_add(width))
        .saturating_add(format.len());
    let allowed = lengths
        .iter()
        .fold(format.len().saturating_add(FORMAT_SLACK), |sum, &len| {
            sum.saturating_add(len.saturating_mul(2))
        });
    if most > allowed {
        return refuse(&format!(
            "format: the output could reach {most} bytes from {allowed} of input (fields \
             repeating an argument, or wide fields)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<Value> {
        args.iter().map(|&a| Value::from(a)).collect()
    }

    #[test]
    fn ordinary_formats_pass() {
        let args = strings(&["user", "hello"]);
        for (format, style) in [
            ("<|%s|>%s", Style::Printf),
            ("%5s: %-10s", Style::Printf),
            ("100%% %s", Style::Printf),
            ("<|{}|>{}", Style::StrFormat),
            ("{0:>8} {1}", Style::StrFormat),
            ("{{literal}} {}", Style::StrFormat),
        ] {
            check_format(format, style, &args).unwrap();
        }
    }

    #[test]
    fn widths_from_arguments_are_refused() {
        let err = check_format("{:{}}", Style::StrFormat, &strings(&["a", "9"])).unwrap_err();
        assert!(err.to_string().contains("widths"), "{err}");
    }

    /// Output bounded by twice the input plus slack: a huge width, or many fields each of which
    /// may print the long argument, is refused; the same fields over a short argument are not.
    /// (printf's widths are minijinja's to check.)
    #[test]
    fn outputs_far_bigger_than_inputs_are_refused() {
        let wide = format!("{{:{}}}", FORMAT_SLACK * 4);
        assert!(check_format(&wide, Style::StrFormat, &strings(&["x"])).is_err());
        assert!(check_format("{:99999999999999999999999}", Style::StrFormat, &[]).is_err());

        let long = "y".repeat(FORMAT_SLACK);
        let repeated = "{0}".repeat(8);
        assert!(check_format(&repeated, Style::StrFormat, &strings(&[&long])).is_err());
        let printf = "%s".repeat(8);
        assert!(check_format(&printf, Style::Printf, &strings(&[&long])).is_err());
        check_format(&repeated, Style::StrFormat, &strings(&["short"])).unwrap();
        // Escaped braces and percents are text, not fields.
        let escaped = "{{0}}".repeat(8);
        check_format(&escaped, Style::StrFormat, &strings(&[&long])).unwrap();
        check_format(&"%%".repeat(8), Style::Printf, &strings(&[&long])).unwrap();
    }
}
