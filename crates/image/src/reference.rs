//! Image references, normalized as kubelet and containerd normalize them.
//!
//! The grammar follows the OCI distribution spec and Docker's reference
//! format (checked against distribution 2.8): an optional registry host, a
//! lowercase repository path, an optional tag and an optional digest.

use std::fmt;

use crate::ImageError;

/// Registry of names without a registry host.
pub const DOCKER_HUB: &str = "docker.io";

/// Older spellings of Docker Hub that normalize to [`DOCKER_HUB`].
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];

/// Repository prefix of Docker Hub's official images (`busybox`).
const OFFICIAL_PREFIX: &str = "library/";

/// Maximum length of `registry/repository`, the limit of Docker's reference package.
const MAX_NAME_LEN: usize = 255;

/// Maximum length of a tag in the reference grammar.
const MAX_TAG_LEN: usize = 128;

/// A normalized image reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host and optional port, `docker.io` for short names.
    pub registry: String,
    /// Repository path, `library/busybox` for a Docker Hub official image.
    pub repository: String,
    /// Tag, `latest` when neither tag nor digest is given.
    pub tag: Option<String>,
    /// Digest, `sha256:...`.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalizes a reference: `busybox` becomes
    /// `docker.io/library/busybox:latest`.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference {
            reference: input.to_string(),
            reason,
        };

        if input.is_empty() {
            return Err(invalid("the reference is empty".into()));
        }
        if input.chars().any(char::is_whitespace) {
            return Err(invalid("the reference contains whitespace".into()));
        }

        let (rest, digest) = split_digest(input).map_err(invalid)?;
        let (name, tag) = split_tag(rest).map_err(invalid)?;
        // As in Docker: such a name would be indistinguishable from an image ID.
        if name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid(
                "a repository name must not be 64 hexadecimal characters, the form of an image ID"
                    .into(),
            ));
        }
        let (registry, repository) = split_registry(name).map_err(invalid)?;
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (tag, _) => tag,
        };

        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Returns `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Returns `registry/repository@digest`, the name pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }

    /// Returns `registry/repository:tag` when the reference has a tag.
    pub fn tagged(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|tag| format!("{}:{tag}", self.name()))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Checks that `digest` is `sha256:` with 64 or `sha512:` with 128
/// lowercase hex digits, and returns the algorithm.
pub(crate) fn check_digest(digest: &str) -> Result<&str, String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!("digest {digest:?} has no algorithm prefix"));
    };
    let want_len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => {
            return Err(format!(
                "digest algorithm {algorithm:?} is not sha256 or sha512"
            ));
        }
    };
    let lower_hex = hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex.len() != want_len || !lower_hex {
        return Err(format!(
            "digest {digest:?} must have {want_len} lowercase hex digits"
        ));
    }
    Ok(algorithm)
}

/// Splits `name[:tag]@digest` at the `@` and checks the digest.
fn split_digest(input: &str) -> Result<(&str, Option<String>), String> {
    let Some((rest, digest)) = input.split_once('@') else {
        return Ok((input, None));
    };
    if digest.contains('@') {
        return Err("the reference has more than one '@'".into());
    }
    check_digest(digest)?;
    Ok((rest, Some(digest.to_string())))
}

/// Splits `name:tag` at a `:` after the last `/`, so a registry port stays
/// in the name, and checks the tag.
fn split_tag(input: &str) -> Result<(&str, Option<String>), String> {
    let last_slash = input.rfind('/').map_or(0, |i| i + 1);
    let Some(colon) = input[last_slash..].rfind(':').map(|i| last_slash + i) else {
        return Ok((input, None));
    };
    let tag = &input[colon + 1..];
    check_tag(tag)?;
    Ok((&input[..colon], Some(tag.to_string())))
}

/// Checks a tag against `[\w][\w.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(word);
    let rest_ok = chars.all(|c| word(c) || c == '.' || c == '-');
    if !first_ok || !rest_ok || tag.len() > MAX_TAG_LEN {
        return Err(format!(
            "tag {tag:?} must be 1 to {MAX_TAG_LEN} letters, digits, '_', '.' or '-', \
             not starting with '.' or '-'"
        ));
    }
    Ok(())
}

/// Splits a name into a normalized registry host and repository path.
fn split_registry(name: &str) -> Result<(String, String), String> {
    if name.starts_with('/') || name.ends_with('/') {
        return Err("the name must not start or end with '/'".into());
    }

    // Like Docker, a first component names a registry only if it looks like
    // a host: it has a dot or a port, or it is `localhost`.
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            check_registry(first)?;
            (normalize_registry(first), rest)
        }
        _ => (DOCKER_HUB.to_string(), name),
    };

    check_repository(repository)?;
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("{OFFICIAL_PREFIX}{repository}")
    } else {
        repository.to_string()
    };
    if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
        return Err(format!("the name is longer than {MAX_NAME_LEN} characters"));
    }
    Ok((registry, repository))
}

/// Lowercases a registry host, since host names are case-insensitive and
/// settings are keyed by them, and maps the older Docker Hub host names to
/// `docker.io`.
pub(crate) fn normalize_registry(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        DOCKER_HUB.to_string()
    } else {
        host
    }
}

/// Checks `host[:port]`, where host is a DNS name, an IPv4 address or a
/// bracketed IPv6 address.
fn check_registry(registry: &str) -> Result<(), String> {
    let bad = || format!("registry {registry:?} is not a valid host[:port]");
    let (host, port) = split_host_port(registry).ok_or_else(bad)?;
    // A leading zero would name the same port under another spelling, and
    // so miss the settings of that registry.
    let port_ok = |port: &str| {
        port.bytes().all(|b| b.is_ascii_digit())
            && !port.starts_with('0')
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    };
    if !port.is_none_or(port_ok) {
        return Err(bad());
    }
    let host_ok = if let Some(ipv6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        ipv6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.split('.').all(is_dns_label)
    };
    if host_ok { Ok(()) } else { Err(bad()) }
}

/// Splits `host[:port]`, keeping the brackets of an IPv6 host.
pub(crate) fn split_host_port(registry: &str) -> Option<(&str, Option<&str>)> {
    if registry.starts_with('[') {
        let end = registry.find(']')?;
        let (host, rest) = registry.split_at(end + 1);
        return match rest {
            "" => Some((host, None)),
            _ => rest.strip_prefix(':').map(|port| (host, Some(port))),
        };
    }
    match registry.split_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((registry, None)),
    }
}

/// Tells whether `label` is a DNS label: letters, digits and inner hyphens.
fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Checks every `/`-separated component of a repository path.
fn check_repository(repository: &str) -> Result<(), String> {
    if repository.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository {repository:?} must be lowercase"));
    }
    for component in repository.split('/') {
        if component == ".." || component == "." {
            return Err(format!(
                "repository {repository:?} has a {component:?} component"
            ));
        }
        if !is_path_component(component) {
            return Err(format!(
                "repository component {component:?} must be lowercase letters and digits \
                 joined by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

/// Matches `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`: runs of lowercase
/// letters and digits joined by one separator each.
fn is_path_component(component: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes_ok = component
        .chars()
        .all(|c| alnum(c) || matches!(c, '.' | '_' | '-'));
    let ends_ok = component.starts_with(alnum) && component.ends_with(alnum);
    if !bytes_ok || !ends_ok {
        return false;
    }
    component
        .split(alnum)
        .filter(|sep| !sep.is_empty())
        .all(|sep| matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(input: &str) -> Reference {
        Reference::parse(input).expect("reference should parse")
    }

    fn reason(input: &str) -> String {
        match Reference::parse(input) {
            Err(ImageError::InvalidReference { reference, reason }) => {
                assert_eq!(reference, input, "the error names the input");
                reason
            }
            other => panic!("{input:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn short_name_gets_docker_hub_library_and_latest() {
        let r = parse("busybox");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
    }

    #[test]
    fn user_repository_stays_out_of_library() {
        assert_eq!(parse("user/app").to_string(), "docker.io/user/app:latest");
        assert_eq!(parse("user/app:v1").to_string(), "docker.io/user/app:v1");
    }

    #[test]
    fn host_with_port_is_kept_as_registry() {
        let r = parse("127.0.0.1:5000/foo:1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "foo");
        assert_eq!(r.tag.as_deref(), Some("1"));
    }

    #[test]
    fn host_like_first_component_is_registry() {
        assert_eq!(parse("quay.io/coreos/etcd").registry, "quay.io");
        assert_eq!(parse("localhost/app").registry, "localhost");
        assert_eq!(parse("localhost:5000/a/b/c").repository, "a/b/c");
        assert_eq!(parse("[::1]:5000/foo:1").registry, "[::1]:5000");
    }

    #[test]
    fn image_id_shaped_names_are_rejected() {
        let id = "cafe".repeat(16);
        for input in [id.clone(), format!("{id}:latest")] {
            assert!(reason(&input).contains("64 hexadecimal"), "{input}");
        }
        assert_eq!(
            parse(&id[..12]).repository,
            format!("library/{}", &id[..12])
        );
    }

    #[test]
    fn registry_host_is_lowercased() {
        assert_eq!(parse("LocalHost:5000/app").registry, "localhost:5000");
        assert_eq!(parse("Quay.IO/coreos/etcd").registry, "quay.io");
        assert_eq!(parse("Docker.IO/library/busybox").registry, "docker.io");
    }

    #[test]
    fn plain_first_component_is_hub_user() {
        let r = parse("myhost/app");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "myhost/app");
    }

    #[test]
    fn docker_hub_aliases_normalize_to_docker_io() {
        for input in [
            "index.docker.io/library/busybox",
            "registry-1.docker.io/busybox",
        ] {
            assert_eq!(parse(input).to_string(), "docker.io/library/busybox:latest");
        }
        assert_eq!(parse("docker.io/busybox").repository, "library/busybox");
    }

    #[test]
    fn digest_only_reference_has_no_tag() {
        let r = parse(&format!("busybox@{SHA}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(SHA));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{SHA}"));
    }

    #[test]
    fn tag_and_digest_are_both_kept() {
        let r = parse(&format!("reg.example:443/repo:1.0@{SHA}"));
        assert_eq!(r.tag.as_deref(), Some("1.0"));
        assert_eq!(r.digest.as_deref(), Some(SHA));
        assert_eq!(r.to_string(), format!("reg.example:443/repo:1.0@{SHA}"));
    }

    #[test]
    fn sha512_digest_is_accepted() {
        let digest = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(parse(&format!("app@{digest}")).digest, Some(digest));
    }

    #[test]
    fn helpers_render_name_digest_and_tag_forms() {
        let r = parse("busybox:1.36");
        assert_eq!(r.name(), "docker.io/library/busybox");
        assert_eq!(
            r.with_digest(SHA),
            format!("docker.io/library/busybox@{SHA}")
        );
        assert_eq!(
            r.tagged().as_deref(),
            Some("docker.io/library/busybox:1.36")
        );
        assert_eq!(parse(&format!("busybox@{SHA}")).tagged(), None);
    }

    #[test]
    fn path_components_accept_separators_of_the_grammar() {
        for input in ["a.b/c_d/e__f/g-h/i---j", "x/0", "a1.b2_c3"] {
            parse(input);
        }
    }

    #[test]
    fn empty_and_whitespace_are_rejected() {
        assert!(reason("").contains("empty"));
        assert!(reason("busy box").contains("whitespace"));
        assert!(reason("busybox\t").contains("whitespace"));
    }

    #[test]
    fn upper_case_repository_is_rejected() {
        assert!(reason("BusyBox").contains("lowercase"));
        assert!(reason("quay.io/Org/app").contains("lowercase"));
    }

    #[test]
    fn bad_tags_are_rejected() {
        assert!(reason("busybox:.hidden").contains("tag"));
        assert!(reason("busybox:-x").contains("tag"));
        assert!(reason("busybox:").contains("tag"));
        assert!(reason("busybox:a+b").contains("tag"));
        assert!(reason(&format!("busybox:{}", "a".repeat(129))).contains("tag"));
        parse(&format!("busybox:{}", "a".repeat(128)));
    }

    #[test]
    fn bad_digests_are_rejected() {
        assert!(reason("busybox@sha256:abc").contains("hex"));
        assert!(
            reason(&format!(
                "busybox@{}",
                SHA.to_uppercase().replace("SHA", "sha")
            ))
            .contains("hex")
        );
        assert!(reason(&format!("busybox@md5:{}", "a".repeat(32))).contains("algorithm"));
        assert!(reason("busybox@0123").contains("algorithm"));
        assert!(reason(&format!("busybox@{SHA}@{SHA}")).contains("'@'"));
    }

    #[test]
    fn dot_dot_components_are_rejected() {
        assert!(reason("quay.io/../etc").contains("\"..\""));
        assert!(reason("a/../b").contains("\"..\""));
    }

    #[test]
    fn leading_or_trailing_slash_is_rejected() {
        assert!(reason("/busybox").contains("'/'"));
        assert!(reason("busybox/").contains("'/'"));
        assert!(reason("busybox/:1").contains("'/'"));
    }

    #[test]
    fn malformed_components_are_rejected() {
        for input in [
            "a//b", "a/-b", "a/b-", "a/b...c", "a/b___c", "a/b._c", "a/.b", "a_/b",
        ] {
            assert!(reason(input).contains("component"), "{input}");
        }
    }

    #[test]
    fn malformed_registries_are_rejected() {
        for input in [
            "reg.io:x/app",
            "reg.io:/app",
            "-reg.io/app",
            "[zz]:5000/app",
            "127.0.0.1:99999/app",
            "127.0.0.1:0/app",
            "127.0.0.1:05000/app",
        ] {
            assert!(reason(input).contains("registry"), "{input}");
        }
    }

    #[test]
    fn overlong_names_are_rejected() {
        let input = format!("quay.io/{}", "a".repeat(250));
        assert!(reason(&input).contains("longer"));
    }
}
