//! Answer extraction and comparison.
//!
//! - arith: the leading integer of the response once spaces are removed ("68", " 68", "68</s>"
//!   decoded as "68", "068" → "68"; "-5" keeps its sign). Nothing numeric at the start: unparsed.
//! - GSM8K: the first number after the LAST `####` on its line, commas and `$` removed, trailing
//!   `.` dropped ("#### $1,234." → "1234"). No `####`, or no number after it: unparsed.
//! - MATH: the content of the LAST `\boxed{...}` (braces balanced, escaped `\{ \}` not counted;
//!   `\boxed 5` without braces takes the next token), normalised: whitespace, `\left`,
//!   `\right`, `\!`, `\,` removed, `\dfrac`/`\tfrac` → `\frac`, surrounding `$` and a trailing
//!   `.` dropped. No `\boxed`, unbalanced braces, or an empty box: unparsed.
//!
//! Two normalised answers are the same when equal as strings, or when both are plain numbers
//! within 1e-6 relative ("72.0" = "72"). Symbolic equivalence (`\frac12` = `0.5`) is NOT decided.

/// Strips leading zeros of a digit string (keeping one), with a sign.
fn canonical_int(neg: bool, digits: &str) -> String {
    let d = digits.trim_start_matches('0');
    let d = if d.is_empty() { "0" } else { d };
    if neg && d != "0" {
        format!("-{d}")
    } else {
        d.to_string()
    }
}

/// The leading integer of `s` with spaces removed, canonical (no leading zeros).
pub fn arith_extract(s: &str) -> Option<String> {
    let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let (neg, rest) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.as_str()),
    };
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if end == 0 {
        return None;
    }
    Some(canonical_int(neg, &rest[..end]))
}

/// The integer after the LAST `=` of `s` (spaces removed), canonical: the final line of a chain
/// scratchpad `"23+41=64;64+17=81"` → "81". No `=`, or no digit right after it: None.
pub fn chain_extract(s: &str) -> Option<String> {
    let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let at = t.rfind('=')?;
    arith_extract(&t[at + 1..]).filter(|a| !a.starts_with('-'))
}

/// Whether `response` has the shape of a chain scratchpad for `prompt`: one line (`;`-separated)
/// per `+` of the prompt, each `digits+digits=digits` (the arithmetic may be wrong).
pub fn chain_shape(response: &str, prompt: &str) -> bool {
    let want = prompt.matches('+').count();
    let t: String = response.chars().filter(|c| !c.is_whitespace()).collect();
    let lines: Vec<&str> = t.split(';').collect();
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    want > 0
        && lines.len() == want
        && lines.iter().all(|l| match l.split_once('=') {
            Some((lhs, rhs)) => {
                digits(rhs) && matches!(lhs.split_once('+'), Some((a, b)) if digits(a) && digits(b))
            }
            None => false,
        })
}

/// The first number of `s` (commas and `$` removed), canonical: "1,234.50" → "1234.5",
/// "72.00" → "72", "-3" → "-3". None when `s` holds no digit.
pub fn gsm8k_normalise(s: &str) -> Option<String> {
    let t: String = s.chars().filter(|&c| c != ',' && c != '$').collect();
    let b = t.as_bytes();
    let start = b.iter().position(|c| c.is_ascii_digit())?;
    let neg = start > 0 && b[start - 1] == b'-';
    let mut end = start;
    while end < b.len() && b[end].is_ascii_digit() {
        end += 1;
    }
    let int = &t[start..end];
    // A fractional part: '.' followed by digits (a trailing '.' is sentence punctuation).
    let mut frac = "";
    if end + 1 < b.len() && b[end] == b'.' && b[end + 1].is_ascii_digit() {
        let fs = end + 1;
        let mut fe = fs;
        while fe < b.len() && b[fe].is_ascii_digit() {
            fe += 1;
        }
        frac = t[fs..fe].trim_end_matches('0');
    }
    let i = canonical_int(false, int);
    let body = if frac.is_empty() {
        i
    } else {
        format!("{i}.{frac}")
    };
    Some(if neg && body != "0" {
        format!("-{body}")
    } else {
        body
    })
}

/// The answer after the last `####` (see the module doc).
pub fn gsm8k_extract(s: &str) -> Option<String> {
    let at = s.rfind("####")?;
    let rest = &s[at + 4..];
    let line = rest.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    gsm8k_normalise(line)
}

/// The normalised form of a MATH answer (see the module doc).
pub fn math_normalise(s: &str) -> String {
    let mut t = s.to_string();
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\!", ""),
        ("\\,", ""),
    ] {
        t = t.replace(from, to);
    }
    // \left and \right, but not \leftarrow / \rightarrow.
    for cmd in ["\\left", "\\right"] {
        let mut out = String::with_capacity(t.len());
        let mut rest = t.as_str();
        while let Some(i) = rest.find(cmd) {
            let after = &rest[i + cmd.len()..];
            let is_cmd = !after.starts_with(|c: char| c.is_ascii_alphabetic());
            out.push_str(&rest[..i]);
            if !is_cmd {
                out.push_str(cmd);
            }
            rest = after;
        }
        out.push_str(rest);
        t = out;
    }
    let t: String = t.chars().filter(|c| !c.is_whitespace()).collect();
    let t = t.trim_matches('$');
    t.trim_end_matches('.').to_string()
}

/// The content of the last `\boxed{...}` (or `\fbox{...}`), normalised.
pub fn math_extract(s: &str) -> Option<String> {
    let (at, cmd) = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|c| s.rfind(c).map(|i| (i, *c)))
        .max_by_key(|&(i, _)| i)?;
    let rest = &s[at + cmd.len()..];
    let content = if let Some(inner) = rest.trim_start().strip_prefix('{') {
        let b = inner.as_bytes();
        let (mut depth, mut i, mut end) = (1usize, 0usize, None);
        while i < b.len() {
            match b[i] {
                b'\\' => i += 1, // skip the escaped character (\{, \}, \\)
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        &inner[..end?]
    } else if rest.starts_with(' ') {
        // "\boxed 5": the next token.
        let r = rest.trim_start();
        let e = r
            .find(|c: char| c.is_whitespace() || c == '$')
            .unwrap_or(r.len());
        &r[..e]
    } else {
        return None;
    };
    let n = math_normalise(content);
    (!n.is_empty()).then_some(n)
}

/// Equal as strings, or both numbers within 1e-6 relative.
pub fn same_answer(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) if x.is_finite() && y.is_finite() => {
            (x - y).abs() <= 1e-6 * y.abs().max(1.0)
        }
        _ => false,
    }
}
