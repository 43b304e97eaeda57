//! Text formatting shared by the commands: sizes, IDs, names and tables.

/// Formats a byte count with decimal units and three significant digits,
/// as podman and docker print sizes: `4.26 MB`, `876 kB`, `12 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];

    // Precision lost above 2^53 bytes does not show at three digits.
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 999.5 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }

    let digits = if value >= 99.95 {
        format!("{value:.0}")
    } else if value >= 9.995 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    let digits = if digits.contains('.') {
        digits.trim_end_matches('0').trim_end_matches('.')
    } else {
        &digits
    };
    format!("{digits} {}", UNITS[unit])
}

/// Returns the hex of an image ID without its `sha256:` prefix.
pub fn id_hex(id: &str) -> &str {
    id.split_once(':').map_or(id, |(_algorithm, hex)| hex)
}

/// Returns the first 12 hex digits of an image ID, as `image ls` shows it.
pub fn short_id(id: &str) -> &str {
    let hex = id_hex(id);
    hex.get(..12).unwrap_or(hex)
}

/// Splits `registry/repository:tag` into repository and tag. A colon
/// before the last slash belongs to a registry port, not to a tag.
pub fn split_repo_tag(name: &str) -> (&str, &str) {
    let last_slash = name.rfind('/').map_or(0, |slash| slash + 1);
    match name[last_slash..].rfind(':') {
        Some(colon) => {
            let colon = last_slash + colon;
            (&name[..colon], &name[colon + 1..])
        }
        None => (name, "<none>"),
    }
}

/// Finds the digest of `repository` among `repository@sha256:...` names,
/// falling back to the first digest.
pub fn digest_for<'a>(repo_digests: &'a [String], repository: &str) -> Option<&'a str> {
    let digest_of = |name: &'a String| name.split_once('@').map(|(_, digest)| digest);
    repo_digests
        .iter()
        .find(|name| {
            name.split_once('@')
                .is_some_and(|(repo, _)| repo == repository)
        })
        .or_else(|| repo_digests.first())
        .and_then(digest_of)
}

/// Renders rows under a header, each column as wide as its widest cell
/// plus three spaces, the last column unpadded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }

    let header: Vec<String> = header.iter().map(|cell| (*cell).to_owned()).collect();
    let mut output = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (index, cell) in row.iter().enumerate() {
            if index + 1 == row.len() {
                line.push_str(cell);
            } else {
                let padding = widths[index] - cell.chars().count() + 3;
                line.push_str(cell);
                line.push_str(&" ".repeat(padding));
            }
        }
        output.push_str(line.trim_end());
        output.push('\n');
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_size_uses_decimal_units_and_three_digits() {
        let cases = [
            (0, "0 B"),
            (12, "12 B"),
            (999, "999 B"),
            (1000, "1 kB"),
            (1234, "1.23 kB"),
            (876_000, "876 kB"),
            (4_260_000, "4.26 MB"),
            (12_345_678, "12.3 MB"),
            (67_108_864, "67.1 MB"),
            (999_999, "1 MB"),
            (1_500_000_000, "1.5 GB"),
        ];
        for (bytes, expected) in cases {
            assert_eq!(human_size(bytes), expected, "{bytes} bytes");
        }
    }

    #[test]
    fn short_id_strips_the_algorithm() {
        let id = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(short_id(id), "0123456789ab");
        assert_eq!(id_hex(id).len(), 64);
        assert_eq!(short_id("abc"), "abc");
    }

    #[test]
    fn split_repo_tag_keeps_registry_ports() {
        let cases = [
            (
                "127.0.0.1:5000/testenv/busybox:latest",
                ("127.0.0.1:5000/testenv/busybox", "latest"),
            ),
            (
                "docker.io/library/busybox:1.35",
                ("docker.io/library/busybox", "1.35"),
            ),
            (
                "127.0.0.1:5000/testenv/busybox",
                ("127.0.0.1:5000/testenv/busybox", "<none>"),
            ),
        ];
        for (name, expected) in cases {
            assert_eq!(split_repo_tag(name), expected, "{name}");
        }
    }

    #[test]
    fn digest_for_prefers_the_same_repository() {
        let digests = vec![
            "a.io/one@sha256:111".to_owned(),
            "b.io/two@sha256:222".to_owned(),
        ];
        assert_eq!(digest_for(&digests, "b.io/two"), Some("sha256:222"));
        assert_eq!(digest_for(&digests, "c.io/three"), Some("sha256:111"));
        assert_eq!(digest_for(&[], "a.io/one"), None);
    }

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec![
                "a.io/busybox".to_owned(),
                "latest".to_owned(),
                "1 kB".to_owned(),
            ],
            vec!["b".to_owned(), "1.35".to_owned(), "12.3 MB".to_owned()],
        ];
        let text = table(&["REPOSITORY", "TAG", "SIZE"], &rows);
        let expected = "\
REPOSITORY     TAG      SIZE
a.io/busybox   latest   1 kB
b              1.35     12.3 MB
";
        assert_eq!(text, expected);
    }
}
