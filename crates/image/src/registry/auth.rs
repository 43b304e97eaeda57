//! Registry authentication: `WWW-Authenticate` challenges, basic
//! credentials and bearer tokens from a token server, cached per scope.
//!
//! The token flow follows the distribution token spec (checked against
//! distribution 2.8 and Docker Hub): GET the realm with `service` and
//! `scope`, or POST an OAuth2 refresh-token grant when only an identity
//! token is known.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::{Credentials, ImageError};

/// Lifetime of a token whose response gives no `expires_in`, as the token
/// spec prescribes.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Maximum size of a token response, far above the few KiB of usual tokens.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// `client_id` sent with OAuth2 requests, so token servers can tell hatoba's requests apart.
const CLIENT_ID: &str = "hatoba";

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Scheme in lowercase: `basic`, `bearer`.
    pub scheme: String,
    /// Parameters with lowercase names and unquoted values.
    pub params: BTreeMap<String, String>,
    /// A bare token after the scheme instead of parameters (`Negotiate abc==`).
    pub token68: Option<String>,
}

/// Parses every challenge of a `WWW-Authenticate` header value (RFC 9110
/// section 11.6.1): schemes followed by comma-separated `name=value` or
/// `name="quoted, value"` parameters.
pub fn parse_challenges(header: &str) -> Result<Vec<Challenge>, String> {
    let mut scanner = Scanner {
        rest: header.trim_start(),
    };
    let mut challenges: Vec<Challenge> = Vec::new();
    loop {
        let after_comma = scanner.skip_separators();
        if scanner.rest.is_empty() {
            return Ok(challenges);
        }
        let word = scanner.token();
        if word.is_empty() {
            return Err(format!("unexpected {:?} in {header:?}", scanner.rest));
        }
        scanner.skip_spaces();
        // A token right after the scheme, without a comma, is a token68.
        let token68_place =
            |c: &Challenge| !after_comma && c.params.is_empty() && c.token68.is_none();
        match (scanner.rest.strip_prefix('='), challenges.last_mut()) {
            (Some(_), Some(challenge)) if token68_place(challenge) && scanner.at_token68_end() => {
                let padding = scanner.rest.len() - scanner.rest.trim_start_matches('=').len();
                scanner.rest = &scanner.rest[padding..];
                challenge.token68 = Some(format!("{word}{}", "=".repeat(padding)));
            }
            (Some(after_equals), Some(challenge)) => {
                scanner.rest = after_equals;
                let value = scanner.value().map_err(|e| format!("{e} in {header:?}"))?;
                challenge.params.insert(word.to_ascii_lowercase(), value);
            }
            (Some(_), None) => return Err(format!("parameter before any scheme in {header:?}")),
            (None, Some(challenge)) if token68_place(challenge) => {
                challenge.token68 = Some(word.to_string());
            }
            (None, _) => challenges.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
                token68: None,
            }),
        }
    }
}

/// A cursor over the unparsed rest of a header value.
struct Scanner<'a> {
    rest: &'a str,
}

impl<'a> Scanner<'a> {
    /// Consumes a token: everything up to a space, comma, `=` or quote.
    fn token(&mut self) -> &'a str {
        let end = self
            .rest
            .find(|c: char| c.is_whitespace() || matches!(c, ',' | '=' | '"'))
            .unwrap_or(self.rest.len());
        let (token, rest) = self.rest.split_at(end);
        self.rest = rest;
        token
    }

    /// Returns whether the rest is `=` padding that ends a token68: only `=`
    /// signs, then the end or a comma.
    fn at_token68_end(&self) -> bool {
        let after = self.rest.trim_start_matches('=').trim_start();
        after.is_empty() || after.starts_with(',')
    }

    /// Consumes a parameter value: a quoted string with `\` escapes, or
    /// anything up to a space or comma (servers send base64 unquoted).
    fn value(&mut self) -> Result<String, String> {
        self.skip_spaces();
        let Some(quoted) = self.rest.strip_prefix('"') else {
            let end = self
                .rest
                .find(|c: char| c.is_whitespace() || c == ',')
                .unwrap_or(self.rest.len());
            let (value, rest) = self.rest.split_at(end);
            self.rest = rest;
            return Ok(value.to_string());
        };
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &quoted[i + 1..];
                    return Ok(value);
                }
                '\\' => value.extend(chars.next().map(|(_, escaped)| escaped)),
                c => value.push(c),
            }
        }
        Err("unterminated quoted string".into())
    }

    fn skip_spaces(&mut self) {
        self.rest = self.rest.trim_start();
    }

    /// Skips spaces and commas, and returns whether there was a comma.
    fn skip_separators(&mut self) -> bool {
        let skipped = self.rest.len()
            - self
                .rest
                .trim_start_matches(|c: char| c.is_whitespace() || c == ',')
                .len();
        let comma = self.rest[..skipped].contains(',');
        self.rest = &self.rest[skipped..];
        comma
    }
}

/// The token server of a bearer challenge, as the distribution token spec defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerChallenge {
    pub realm: reqwest::Url,
    pub service: Option<String>,
    /// Scope the registry asked for, if it named one.
    pub scope: Option<String>,
}

impl BearerChallenge {
    /// Reads the realm, service and scope of a `bearer` challenge.
    pub fn from_challenge(challenge: &Challenge) -> Result<Self, String> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or("bearer challenge has no realm")?;
        let realm = reqwest::Url::parse(realm).map_err(|e| format!("realm {realm:?}: {e}"))?;
        if !matches!(realm.scheme(), "http" | "https") {
            return Err(format!("realm {realm} is not an http or https URL"));
        }
        Ok(Self {
            realm,
            service: challenge.params.get("service").cloned(),
            scope: challenge.params.get("scope").cloned(),
        })
    }
}

/// A token server's response. Docker Hub sends `token`, OAuth2 servers send
/// `access_token`, and some send both.
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The failure of a token request.
pub enum TokenError {
    /// The token server refused the credentials.
    Refused(String),
    /// The token server could not be reached or stopped responding.
    Unreachable(String),
    /// The token server returned an error status or an unreadable body.
    BadTestResponse(String),
}

/// Asks the token server of `challenge` for a token covering `scopes`, and
/// returns the `Authorization` value and when it expires.
pub async fn fetch_token(
    http: &reqwest::Client,
    challenge: &BearerChallenge,
    scopes: &[String],
    credentials: Option<&Credentials>,
) -> Result<(HeaderValue, Instant), TokenError> {
    let mut params: Vec<(&str, &str)> = Vec::new();
    if let Some(service) = &challenge.service {
        params.push(("service", service));
    }
    params.extend(scopes.iter().map(|scope| ("scope", scope.as_str())));

    let request = match credentials {
        Some(c) if c.username.is_empty() && !c.identity_token.is_empty() => {
            params.extend([
                ("grant_type", "refresh_token"),
                ("refresh_token", c.identity_token.as_str()),
                ("client_id", CLIENT_ID),
            ]);
            http.post(challenge.realm.clone()).form(&params)
        }
        Some(c) if !c.username.is_empty() => http
            .get(challenge.realm.clone())
            .query(&params)
            .basic_auth(&c.username, Some(&c.password)),
        _ => http.get(challenge.realm.clone()).query(&params),
    };

    let response = request
        .send()
        .await
        .map_err(|e| TokenError::Unreachable(super::error_chain(e)))?;
    let status = response.status();
    if matches!(status.as_u16(), 401 | 403) {
        return Err(TokenError::Refused(format!(
            "token server returned {status}"
        )));
    }
    if !status.is_success() {
        return Err(TokenError::BadTestResponse(format!(
            "token server returned {status}"
        )));
    }
    let body = super::read_limited(response, MAX_TOKEN_RESPONSE)
        .await
        .map_err(|e| TokenError::Unreachable(e.to_string()))?;
    token_from_body(&body).map_err(TokenError::BadTestResponse)
}

/// Reads the token and its lifetime from a token server's JSON response.
fn token_from_body(body: &[u8]) -> Result<(HeaderValue, Instant), String> {
    let response: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("invalid token response: {e}"))?;
    let token = match (response.token, response.access_token) {
        (token, _) if !token.is_empty() => token,
        (_, access_token) if !access_token.is_empty() => access_token,
        _ => return Err("token response has neither token nor access_token".into()),
    };
    let lifetime = response
        .expires_in
        .filter(|seconds| *seconds > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    Ok((bearer_header(&token)?, Instant::now() + lifetime))
}

/// Builds `Authorization: Bearer <token>`, marked sensitive so it never
/// shows in debug output.
pub fn bearer_header(token: &str) -> Result<HeaderValue, String> {
    sensitive(&format!("Bearer {token}")).map_err(|_| "the token has invalid characters".into())
}

/// Builds `Authorization: Basic <base64(user:password)>`.
pub fn basic_header(credentials: &Credentials) -> Result<HeaderValue, String> {
    let pair = format!("{}:{}", credentials.username, credentials.password);
    sensitive(&format!("Basic {}", BASE64.encode(pair)))
        .map_err(|_| "the username has invalid characters".into())
}

fn sensitive(value: &str) -> Result<HeaderValue, reqwest::header::InvalidHeaderValue> {
    let mut header = HeaderValue::from_str(value)?;
    header.set_sensitive(true);
    Ok(header)
}

/// Returns whether `credentials` contain anything to authenticate with.
pub fn has_credentials(credentials: Option<&Credentials>) -> bool {
    credentials.is_some_and(|c| {
        !c.username.is_empty() || !c.identity_token.is_empty() || !c.registry_token.is_empty()
    })
}

/// Identifies one cached authorization: the endpoint, the scope, and a
/// hash of the credentials, so that a pull without credentials never reuses
/// a token that another pull's credentials earned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    endpoint: String,
    scope: String,
    credentials: [u8; 32],
}

impl CacheKey {
    /// Builds the key of `endpoint` and `scope` for these credentials.
    pub fn new(endpoint: &str, scope: &str, credentials: Option<&Credentials>) -> Self {
        let mut hasher = Sha256::new();
        if let Some(c) = credentials {
            for part in [
                &c.username,
                &c.password,
                &c.identity_token,
                &c.registry_token,
            ] {
                hasher.update(part.len().to_le_bytes());
                hasher.update(part.as_bytes());
            }
        }
        Self {
            endpoint: endpoint.to_string(),
            scope: scope.to_string(),
            credentials: hasher.finalize().into(),
        }
    }
}

/// `Authorization` values that worked, until they expire.
#[derive(Default)]
pub struct AuthCache {
    entries: Mutex<HashMap<CacheKey, (HeaderValue, Option<Instant>)>>,
}

impl AuthCache {
    /// Returns the cached value for `key` if it has not expired.
    pub fn get(&self, key: &CacheKey) -> Option<HeaderValue> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (value, expires) = entries.get(key)?;
        if expires.is_some_and(|at| at <= Instant::now()) {
            entries.remove(key);
            return None;
        }
        Some(value.clone())
    }

    /// Stores `value` for `key`. `expires` is `None` for basic credentials.
    pub fn put(&self, key: CacheKey, value: HeaderValue, expires: Option<Instant>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (_, at)| at.is_none_or(|at| at > Instant::now()));
        entries.insert(key, (value, expires));
    }

    /// Removes `key` after the registry rejected its value.
    pub fn remove(&self, key: &CacheKey) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(key);
    }
}

/// Maps a token error to the image error of the registry it was for.
pub fn token_error(
    error: TokenError,
    registry: &str,
    reference: &str,
    realm: &reqwest::Url,
    sent_credentials: bool,
) -> ImageError {
    match error {
        TokenError::Refused(reason) => {
            let hint = if sent_credentials {
                "check the pull credentials"
            } else {
                "no credentials were given: add pull credentials"
            };
            ImageError::Unauthenticated {
                registry: registry.to_string(),
                reference: reference.to_string(),
                reason: format!("{reason} at {realm}; {hint}"),
            }
        }
        TokenError::Unreachable(reason) => ImageError::RegistryUnavailable {
            registry: registry.to_string(),
            reason: format!("token server {realm}: {reason}"),
        },
        TokenError::BadTestResponse(reason) => ImageError::Registry {
            registry: registry.to_string(),
            reference: reference.to_string(),
            reason: format!("token server {realm}: {reason}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(header: &str) -> Challenge {
        let mut challenges = parse_challenges(header).expect("header should parse");
        assert_eq!(challenges.len(), 1, "{challenges:?}");
        challenges.remove(0)
    }

    #[test]
    fn bearer_challenge_with_quoted_params_parses() {
        let c = one(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["service"], "registry.example");
        assert_eq!(c.params["scope"], "repository:library/busybox:pull");
    }

    #[test]
    fn commas_and_escapes_inside_quotes_are_kept() {
        let c = one(r#"Bearer scope="repository:a:pull,push", error="say \"hi\"""#);
        assert_eq!(c.params["scope"], "repository:a:pull,push");
        assert_eq!(c.params["error"], r#"say "hi""#);
    }

    #[test]
    fn unquoted_values_spaces_and_case_are_handled() {
        let c = one("BASIC   Realm = hatoba , charset=UTF-8");
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "hatoba");
        assert_eq!(c.params["charset"], "UTF-8");
    }

    #[test]
    fn several_challenges_in_one_header_are_split() {
        let challenges =
            parse_challenges(r#"Basic realm="a, b", Bearer realm="https://t/x",service=s"#)
                .expect("parses");
        assert_eq!(challenges.len(), 2);
        assert_eq!(challenges[0].scheme, "basic");
        assert_eq!(challenges[0].params["realm"], "a, b");
        assert_eq!(challenges[1].scheme, "bearer");
        assert_eq!(challenges[1].params["service"], "s");
    }

    #[test]
    fn scheme_without_params_and_token68_parse() {
        let challenges = parse_challenges("Negotiate abc==, Basic, Other xyz").expect("parses");
        let schemes: Vec<_> = challenges.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["negotiate", "basic", "other"]);
        assert_eq!(challenges[0].token68.as_deref(), Some("abc=="));
        assert_eq!(challenges[1].token68, None);
        assert_eq!(challenges[2].token68.as_deref(), Some("xyz"));
        let c = one("Bearer realm=abc, token=ab/c==");
        assert_eq!(c.params["realm"], "abc");
        assert_eq!(c.params["token"], "ab/c==");
        assert_eq!(c.token68, None);
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert!(parse_challenges(r#"Bearer realm="open"#).is_err());
        assert!(parse_challenges("realm=x").is_err());
        assert!(parse_challenges(r#"Bearer "x""#).is_err());
        assert_eq!(parse_challenges("").expect("empty parses"), vec![]);
    }

    #[test]
    fn bearer_challenge_needs_an_http_realm() {
        let ok = one(r#"Bearer realm="http://127.0.0.1:1/token",service=reg"#);
        let bearer = BearerChallenge::from_challenge(&ok).expect("valid realm");
        assert_eq!(bearer.realm.as_str(), "http://127.0.0.1:1/token");
        assert_eq!(bearer.service.as_deref(), Some("reg"));
        assert_eq!(bearer.scope, None);
        for bad in [
            r#"Bearer service=x"#,
            r#"Bearer realm="file:///etc/passwd""#,
            "Bearer realm=x",
        ] {
            assert!(BearerChallenge::from_challenge(&one(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_response_reads_token_or_access_token() {
        let (header, _) = token_from_body(br#"{"token":"t1","expires_in":300}"#).expect("token");
        assert_eq!(header, "Bearer t1");
        assert!(header.is_sensitive());
        let (header, _) = token_from_body(br#"{"access_token":"t2"}"#).expect("access_token");
        assert_eq!(header, "Bearer t2");
        assert!(token_from_body(br#"{"expires_in":3}"#).is_err());
        assert!(token_from_body(b"not json").is_err());
    }

    #[test]
    fn token_lifetime_defaults_to_sixty_seconds() {
        let before = Instant::now();
        let (_, expires) = token_from_body(br#"{"token":"t"}"#).expect("token");
        assert!(expires >= before + DEFAULT_TOKEN_LIFETIME);
        let (_, expires) = token_from_body(br#"{"token":"t","expires_in":3600}"#).expect("token");
        assert!(expires >= before + Duration::from_secs(3600));
    }

    #[test]
    fn basic_header_encodes_user_and_password() {
        let credentials = Credentials {
            username: "user".into(),
            password: "pa:ss".into(),
            ..Credentials::default()
        };
        let header = basic_header(&credentials).expect("header");
        assert_eq!(header, format!("Basic {}", BASE64.encode("user:pa:ss")));
    }

    #[test]
    fn cache_separates_credentials_and_drops_expired_entries() {
        let cache = AuthCache::default();
        let alice = Credentials {
            username: "alice".into(),
            ..Credentials::default()
        };
        let with = CacheKey::new("https://r", "repository:a:pull", Some(&alice));
        let without = CacheKey::new("https://r", "repository:a:pull", None);
        let value = HeaderValue::from_static("Bearer x");
        cache.put(with.clone(), value.clone(), None);
        assert_eq!(cache.get(&with), Some(value.clone()));
        assert_eq!(cache.get(&without), None);

        cache.put(without.clone(), value, Some(Instant::now()));
        assert_eq!(cache.get(&without), None);
        cache.remove(&with);
        assert_eq!(cache.get(&with), None);
    }

    /// Starts a token endpoint that returns a token for every request.
    async fn token_endpoint() -> (super::super::test_server::TestServer, BearerChallenge) {
        use super::super::test_server::{TestResponse, TestServer};
        let server = TestServer::start("127.0.0.1", |_, _| {
            TestResponse::new(200).body(r#"{"access_token":"t","expires_in":10}"#)
        })
        .await;
        let challenge = BearerChallenge {
            realm: reqwest::Url::parse(&format!("http://{}/token", server.addr)).expect("realm"),
            service: Some("svc".into()),
            scope: None,
        };
        (server, challenge)
    }

    #[tokio::test]
    async fn token_request_sends_basic_credentials() {
        let (server, challenge) = token_endpoint().await;
        let credentials = Credentials {
            username: "user".into(),
            password: "pass".into(),
            ..Credentials::default()
        };
        let scopes = ["repository:a:pull".to_string()];
        let http = reqwest::Client::new();
        let result = fetch_token(&http, &challenge, &scopes, Some(&credentials)).await;
        assert!(result.is_ok());

        let request = &server.requests()[0];
        assert_eq!(request.method, "GET");
        assert_eq!(request.header("authorization"), Some("Basic dXNlcjpwYXNz"));
        assert!(
            request
                .target
                .contains("service=svc&scope=repository%3Aa%3Apull")
        );
    }

    #[tokio::test]
    async fn identity_token_uses_refresh_grant() {
        let (server, challenge) = token_endpoint().await;
        let credentials = Credentials {
            identity_token: "refresh-me".into(),
            ..Credentials::default()
        };
        let scopes = ["repository:a:pull".to_string()];
        let http = reqwest::Client::new();
        let result = fetch_token(&http, &challenge, &scopes, Some(&credentials)).await;
        assert!(result.is_ok());

        let request = &server.requests()[0];
        assert_eq!(request.method, "POST");
        assert_eq!(request.header("authorization"), None);
        for field in [
            "grant_type=refresh_token",
            "refresh_token=refresh-me",
            "client_id=hatoba",
            "service=svc",
        ] {
            assert!(request.body.contains(field), "{field} in {}", request.body);
        }
    }
}
