//! Minimal CSV (RFC 4180: commas, double quotes, doubled quotes inside quotes), enough for
//! the official `relative path, caption` index written by Python's csv module.

use crate::error::{Error, Result};

/// Parses CSV text into rows of fields. Quoted fields may hold commas, quotes and newlines.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                line += 1;
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(Error::Config(format!(
            "{origin}: unterminated quoted field before line {line}"
        )));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// Writes one CSV row, quoting fields that need it.
pub fn row(fields: &[&str]) -> String {
    let q: Vec<String> = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.to_string()
            }
        })
        .collect();
    format!("{}\n", q.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_round_trip() {
        let caption = "a \"red\", round\nthing";
        let text = row(&["000000/000000/00001.png", caption]) + &row(&["x.png", "plain"]);
        let rows = parse(&text, "t").unwrap();
        assert_eq!(
            rows,
            vec![
                vec!["000000/000000/00001.png".to_string(), caption.to_string()],
                vec!["x.png".into(), "plain".into()]
            ]
        );
        assert!(parse("\"open", "t")
            .unwrap_err()
            .to_string()
            .contains("unterminated"));
    }
}
