//! Helpers for streaming text through marker detection without emitting half a marker.

/// Length of the longest suffix of `text` that is a proper prefix of one of `markers`.
///
/// A streaming parser must hold these bytes back: the next delta may complete the marker.
/// The result always lies on a char boundary of `text`.
pub fn partial_marker_len(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for marker in markers {
        let max = marker.len().saturating_sub(1).min(text.len());
        for len in (best + 1..=max).rev() {
            let start = text.len() - len;
            if text.is_char_boundary(start) && marker.starts_with(&text[start..]) {
                best = len;
                break;
            }
        }
    }
    best
}

/// Split `text` into (safe to emit, must hold back) given the markers that may be completed later.
pub fn split_safe<'a>(text: &'a str, markers: &[&str]) -> (&'a str, &'a str) {
    let hold = partial_marker_len(text, markers);
    text.split_at(text.len() - hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_only_marker_prefixes() {
        assert_eq!(partial_marker_len("abc</mm:th", &["</mm:think>"]), 7);
        assert_eq!(partial_marker_len("abc<", &["</mm:think>"]), 1);
        assert_eq!(partial_marker_len("abc", &["</mm:think>"]), 0);
        // A complete marker is not a *proper* prefix: the caller finds it with `find`.
        assert_eq!(partial_marker_len("</mm:think>", &["</mm:think>"]), 0);
        assert_eq!(split_safe("héllo <mm", &["<mm:think>"]), ("héllo ", "<mm"));
        assert_eq!(partial_marker_len("x]<]mini", &["]<]minimax[>[<tool_call>", "<mm:think>"]), 7);
    }
}
