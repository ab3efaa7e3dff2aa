//! The one rule for every CSV the gateway writes (the live feed, `export`, the rescue log entry):
//! written by the `csv` writer, and every text cell made safe to open in a spreadsheet, so a chip,
//! bib or alias that would start a formula is neutralised as OWASP recommends against CSV
//! injection.

/// A text cell made safe to open in a spreadsheet: one that starts with `=`, `+`, `-` or `@`
/// (after blanks, tabs or carriage returns) gets a leading `'` (OWASP, "CSV Injection"), so
/// Excel or LibreOffice show it as text instead of evaluating it. Control characters (a line end in a bib-map cell) become
/// spaces, so that every record is one line for line-based readers; quoting is the writer's job.
pub fn cell(text: &str) -> std::borrow::Cow<'_, str> {
    let text: std::borrow::Cow<'_, str> = if text.chars().any(char::is_control) {
        text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().into()
    } else {
        text.into()
    };
    // Leading blanks (a tab or carriage return became one above) do not hide a formula.
    if text.trim_start().starts_with(['=', '+', '-', '@']) { format!("'{text}").into() } else { text }
}

/// One CSV record (cells neutralised by [`cell`]) with its `\n`.
pub fn csv_line(cells: &[&str]) -> String {
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = w.write_record(cells.iter().map(|c| cell(c).into_owned()));
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_neutralised_and_commas_quoted() {
        assert_eq!(cell("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        for risky in ["+1", "-2+3", "@SUM(A1)", "\t=x", "\r=x", " =1"] {
            assert!(cell(risky).starts_with('\''), "{risky:?}");
        }
        assert_eq!(cell("208"), "208");
        assert_eq!(cell(""), "");
        assert_eq!(
            csv_line(&["1", "A,B", "=1+1", "2026-01-01T00:00:00.000Z"]),
            "1,\"A,B\",'=1+1,2026-01-01T00:00:00.000Z\n"
        );
        assert_eq!(cell(" 12"), " 12");
        assert_eq!(csv_line(&["2", "x\n999,FORGED"]), "2,\"x 999,FORGED\"\n", "one record, one line");
    }
}
