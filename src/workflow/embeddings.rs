//! `embedding:NAME` references in prompt text, found the way ComfyUI's CLIP tokenizer finds them
//! (`comfy/sd1_clip.py`: `token_weights`, then a split on ` embedding:` / `\nembedding:`, then
//! the first whitespace-separated word, commas stripped).
//!
//! Following the tokenizer rather than a plain substring search matters: `(embedding:x:1.2)` is
//! a weighted reference to `x`, while `foo,embedding:x` is not a reference at all.

/// The tokenizer's trigger.
const IDENTIFIER: &str = "embedding:";

/// Parentheses nested deeper than this are flattened rather than unwrapped level by level.
/// ComfyUI recurses without limit; real prompts nest a few levels, and the bound keeps hostile
/// input from costing quadratic time or a deep stack.
const MAX_WEIGHT_DEPTH: usize = 32;

/// Markers for escaped parentheses (`escape_important`): never found in prompt text.
const ESCAPED_CLOSE: &str = "\u{0}\u{1}";
const ESCAPED_OPEN: &str = "\u{0}\u{2}";

/// Embedding names referenced in `text`, in order of appearance (duplicates kept).
pub fn embedding_names(text: &str) -> Vec<String> {
    if !text.contains(IDENTIFIER) {
        return Vec::new();
    }
    let escaped = text
        .replace("\\)", ESCAPED_CLOSE)
        .replace("\\(", ESCAPED_OPEN);
    let mut segments = Vec::new();
    weighted_segments(&escaped, 0, &mut segments);
    let mut names = Vec::new();
    for segment in segments {
        let segment = segment
            .replace(ESCAPED_CLOSE, ")")
            .replace(ESCAPED_OPEN, "(");
        for word in split_on_identifier(&segment) {
            let Some(rest) = word.strip_prefix(IDENTIFIER) else {
                continue;
            };
            let rest = rest.trim_matches('\n');
            let Some(first) = rest.split_whitespace().next() else {
                continue;
            };
            let name = first.trim_matches(',');
            if !name.is_empty() {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// `re.split(' embedding:|\nembedding:', s)` with the identifier put back on every part after
/// the first.
fn split_on_identifier(segment: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = segment;
    let mut current_prefix = "";
    loop {
        let space = rest.find(" embedding:");
        let newline = rest.find("\nembedding:");
        let cut = match (space, newline) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => break,
        };
        parts.push(format!("{current_prefix}{}", &rest[..cut]));
        current_prefix = IDENTIFIER;
        rest = &rest[cut + 1 + IDENTIFIER.len()..];
    }
    parts.push(format!("{current_prefix}{rest}"));
    parts
}

/// ComfyUI's `token_weights`: the text split into runs, `(…)` groups unwrapped (and their
/// `:weight` suffix dropped) recursively.
fn weighted_segments(text: &str, depth: usize, out: &mut Vec<String>) {
    for item in parse_parentheses(text) {
        let inner = item
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .filter(|_| item.len() >= 2 && depth < MAX_WEIGHT_DEPTH);
        match inner {
            Some(inner) => {
                let inner = match inner.rfind(':') {
                    Some(colon)
                        if colon > 0 && inner[colon + 1..].trim().parse::<f64>().is_ok() =>
                    {
                        &inner[..colon]
                    }
                    _ => inner,
                };
                weighted_segments(inner, depth + 1, out);
            }
            // Past the depth bound the groups are flattened instead of unwrapped one by one.
            None if depth >= MAX_WEIGHT_DEPTH => {
                out.push(item.chars().filter(|c| !matches!(c, '(' | ')')).collect());
            }
            None => out.push(item),
        }
    }
}

/// ComfyUI's `parse_parentheses`: top-level runs and balanced `(…)` groups.
fn parse_parentheses(text: &str) -> Vec<String> {
    let mut result = Vec::new();
    let mut current = String::new();
    let mut level: i64 = 0;
    for c in text.chars() {
        match c {
            '(' => {
                if level == 0 {
                    if !current.is_empty() {
                        result.push(std::mem::take(&mut current));
                    }
                    current.push('(');
                } else {
                    current.push(c);
                }
                level += 1;
            }
            ')' => {
                level -= 1;
                if level == 0 {
                    current.push(')');
                    result.push(std::mem::take(&mut current));
                } else {
                    current.push(c);
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        result.push(current);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_references() {
        assert_eq!(
            embedding_names(
                "photograph in the style of embedding:SDA768.pt girl with blonde hair\nlandscape"
            ),
            ["SDA768.pt"]
        );
        assert_eq!(embedding_names("embedding:first, text"), ["first"]);
        assert_eq!(
            embedding_names("a embedding:one,, b\nembedding:two"),
            ["one", "two"]
        );
        assert!(embedding_names("no references here").is_empty());
    }

    #[test]
    fn weighted_references() {
        assert_eq!(embedding_names("(embedding:neg:1.2), x"), ["neg"]);
        assert_eq!(embedding_names("((embedding:deep))"), ["deep"]);
        assert_eq!(
            embedding_names("a (b embedding:in_group:0.8) c"),
            ["in_group"]
        );
    }

    #[test]
    fn not_references() {
        // The tokenizer only splits at a space or a newline.
        assert!(embedding_names("foo,embedding:bar").is_empty());
        assert!(embedding_names("embedding:").is_empty());
        // ComfyUI takes the first word after the identifier, even after a space.
        assert_eq!(embedding_names("x embedding: y"), ["y"]);
        assert!(embedding_names("x embedding:,,, y").is_empty());
    }

    #[test]
    fn subfolders_and_escapes() {
        assert_eq!(
            embedding_names(r"x embedding:neg\bad_hands \(escaped\)"),
            [r"neg\bad_hands"]
        );
    }

    #[test]
    fn hostile_nesting_is_bounded() {
        let text = format!("{}embedding:x{}", "(".repeat(10_000), ")".repeat(10_000));
        assert_eq!(embedding_names(&text), ["x"]);
        let unbalanced = format!("a embedding:y {}", ")".repeat(1000));
        assert_eq!(embedding_names(&unbalanced), ["y"]);
    }
}
