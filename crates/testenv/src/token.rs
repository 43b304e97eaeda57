//! The token server of the token registry: it issues RS256 JSON Web Tokens
//! in the format that Docker's registry 2.8 verifies (`auth.token`).
//!
//! `GET /token?service=..&scope=repository:NAME:ACTIONS` with Basic
//! credentials of the token user returns a token that grants the requested
//! actions. Without credentials it returns a token that grants nothing, so
//! the registry returns 401, as it does for an anonymous pull of a private
//! repository. Wrong credentials get 401 from the token server itself.
//! `POST /token` with an OAuth2 password grant form works the same way.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rsa::RsaPrivateKey;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::net::TcpListener;

/// Lifetime of issued tokens in seconds.
pub const TOKEN_LIFETIME_SECS: u64 = 300;

/// Actions a valid user may be granted on a repository.
const GRANTABLE_ACTIONS: [&str; 4] = ["pull", "push", "delete", "*"];

/// Largest POST form the server reads, in bytes.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The token server or its key material failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("failed to run openssl to generate {cert}: {source}; install the openssl package")]
    RunOpenssl {
        cert: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("openssl failed to generate {cert} ({status}): {stderr}")]
    Openssl {
        cert: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid RSA private key in {path}: {reason}")]
    InvalidKey { path: PathBuf, reason: String },

    #[error("invalid PEM certificate in {path}: {reason}")]
    InvalidCertificate { path: PathBuf, reason: String },

    #[error("failed to encode the token {part}: {source}")]
    Encode {
        part: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("failed to sign a token: {source}")]
    Sign {
        #[source]
        source: rsa::signature::Error,
    },

    #[error("failed to listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to accept a connection on {addr}: {source}")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// Parses a scope such as `repository:private/busybox:pull,push`. The name
/// may contain colons (a registry host with a port), so the type ends at the
/// first colon and the actions start after the last one.
pub fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    if kind.is_empty() || name.is_empty() {
        return None;
    }
    Some(Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions: actions
            .split(',')
            .filter(|action| !action.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// Generates a self-signed RSA certificate and its key with the openssl
/// command, unless both files already exist.
pub fn ensure_certificate(key: &Path, cert: &Path) -> Result<(), TokenError> {
    if key.exists() && cert.exists() {
        return Ok(());
    }
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes"])
        .args(["-days", "3650", "-subj", "/CN=hatoba-testenv token signer"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .map_err(|source| TokenError::RunOpenssl {
            cert: cert.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(TokenError::Openssl {
            cert: cert.to_path_buf(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Signs tokens with the RSA key whose certificate the registry trusts.
pub struct TokenIssuer {
    signing_key: SigningKey<Sha256>,
    /// Base64 (standard alphabet) DER of the certificate, for `x5c`.
    certificate: String,
    issuer: String,
}

#[derive(Serialize)]
struct Header<'a> {
    typ: &'a str,
    alg: &'a str,
    x5c: [&'a str; 1],
}

/// Claims of an issued token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    pub access: Vec<Access>,
}

impl TokenIssuer {
    /// Loads a PEM private key (PKCS#8 or PKCS#1) and a PEM certificate.
    pub fn from_pem_files(key: &Path, cert: &Path, issuer: &str) -> Result<Self, TokenError> {
        let key_pem = std::fs::read_to_string(key).map_err(|source| TokenError::Read {
            path: key.to_path_buf(),
            source,
        })?;
        let private_key = RsaPrivateKey::from_pkcs8_pem(&key_pem)
            .or_else(|_| RsaPrivateKey::from_pkcs1_pem(&key_pem))
            .map_err(|error| TokenError::InvalidKey {
                path: key.to_path_buf(),
                reason: error.to_string(),
            })?;

        let cert_pem = std::fs::read_to_string(cert).map_err(|source| TokenError::Read {
            path: cert.to_path_buf(),
            source,
        })?;
        let der = certificate_der(&cert_pem).map_err(|reason| TokenError::InvalidCertificate {
            path: cert.to_path_buf(),
            reason,
        })?;

        Ok(TokenIssuer {
            signing_key: SigningKey::<Sha256>::new(private_key),
            certificate: STANDARD.encode(der),
            issuer: issuer.to_string(),
        })
    }

    /// Signs a token for `subject` (empty for anonymous) that the registry
    /// named `audience` accepts, valid from `now` for five minutes.
    pub fn issue(
        &self,
        subject: &str,
        audience: &str,
        access: Vec<Access>,
        now: u64,
    ) -> Result<String, TokenError> {
        let header = Header {
            typ: "JWT",
            alg: "RS256",
            x5c: [&self.certificate],
        };
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_string(),
            aud: audience.to_string(),
            exp: now + TOKEN_LIFETIME_SECS,
            // A little slack for registries whose clock is behind ours.
            nbf: now.saturating_sub(10),
            iat: now,
            jti: format!("{:032x}", rand::random::<u128>()),
            access,
        };
        let header = serde_json::to_vec(&header).map_err(|source| TokenError::Encode {
            part: "header",
            source,
        })?;
        let claims = serde_json::to_vec(&claims).map_err(|source| TokenError::Encode {
            part: "claims",
            source,
        })?;

        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature = self
            .signing_key
            .try_sign(signing_input.as_bytes())
            .map_err(|source| TokenError::Sign { source })?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        ))
    }
}

/// Extracts the DER bytes of the first certificate in a PEM file.
fn certificate_der(pem: &str) -> Result<Vec<u8>, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN).ok_or("no BEGIN CERTIFICATE line")? + BEGIN.len();
    let end = pem[start..].find(END).ok_or("no END CERTIFICATE line")? + start;
    let body: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(body).map_err(|error| error.to_string())
}

/// Settings of a running token server.
pub struct TokenServer {
    pub issuer: TokenIssuer,
    /// Service name the server issues tokens for (the `aud` claim).
    pub service: String,
    pub user: String,
    pub password: String,
}

/// Caller identity derived from a request's credentials.
#[derive(Debug, PartialEq, Eq)]
enum Caller {
    Anonymous,
    User(String),
    Rejected,
}

/// A parsed token request from a GET query or a POST form.
struct TokenRequest {
    service: Option<String>,
    scopes: Vec<String>,
    caller: Caller,
}

#[derive(Serialize)]
struct TokenResponse {
    token: String,
    access_token: String,
    expires_in: u64,
    issued_at: String,
}

impl TokenServer {
    /// Accepts connections on `listener` and serves token requests until
    /// the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<(), TokenError> {
        let addr = listener.local_addr().map_err(|source| TokenError::Accept {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        tracing::info!(%addr, service = %self.service, "token server listening");
        loop {
            let (stream, peer) = listener
                .accept()
                .await
                .map_err(|source| TokenError::Accept { addr, source })?;
            let server = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let server = Arc::clone(&server);
                    async move { Ok::<_, Infallible>(server.handle(request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%peer, %error, "token server connection ended with an error");
                }
            });
        }
    }

    /// Binds `addr` and serves token requests until the process ends.
    pub async fn run(self, addr: SocketAddr) -> Result<(), TokenError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TokenError::Bind { addr, source })?;
        Arc::new(self).serve(listener).await
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() != "/token" {
            return error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "only /token is served");
        }
        let parsed = match *request.method() {
            Method::GET => Ok(self.parse_get(&request)),
            Method::POST => self.parse_post(request).await,
            _ => Err(error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "use GET or POST",
            )),
        };
        match parsed {
            Ok(token_request) => self.respond(token_request),
            Err(response) => response,
        }
    }

    fn parse_get(&self, request: &Request<Incoming>) -> TokenRequest {
        let mut service = None;
        let mut scopes = Vec::new();
        let query = request.uri().query().unwrap_or("");
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "service" => service = Some(value.into_owned()),
                "scope" => scopes.extend(value.split(' ').map(str::to_string)),
                _ => {}
            }
        }
        let caller = match request.headers().get(AUTHORIZATION) {
            None => Caller::Anonymous,
            Some(value) => self.check_basic(value.to_str().unwrap_or("")),
        };
        TokenRequest {
            service,
            scopes,
            caller,
        }
    }

    async fn parse_post(
        &self,
        request: Request<Incoming>,
    ) -> Result<TokenRequest, Response<Full<Bytes>>> {
        let body = Limited::new(request.into_body(), MAX_FORM_BYTES)
            .collect()
            .await
            .map_err(|error| {
                error_response(
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    &format!("failed to read the form: {error}"),
                )
            })?
            .to_bytes();

        let mut service = None;
        let mut scopes = Vec::new();
        let mut grant_type = None;
        let mut username = None;
        let mut password = None;
        for (key, value) in form_urlencoded::parse(&body) {
            match key.as_ref() {
                "service" => service = Some(value.into_owned()),
                "scope" => scopes.extend(value.split(' ').map(str::to_string)),
                "grant_type" => grant_type = Some(value.into_owned()),
                "username" => username = Some(value.into_owned()),
                "password" => password = Some(value.into_owned()),
                _ => {}
            }
        }
        if grant_type.as_deref() != Some("password") {
            return Err(error_response(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED_GRANT_TYPE",
                "only grant_type=password is supported",
            ));
        }
        let caller = match (username, password) {
            (Some(user), Some(password)) => self.check_user(&user, &password),
            _ => Caller::Anonymous,
        };
        Ok(TokenRequest {
            service,
            scopes,
            caller,
        })
    }

    fn check_basic(&self, header: &str) -> Caller {
        let Some(encoded) = header.strip_prefix("Basic ") else {
            return Caller::Rejected;
        };
        let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
            return Caller::Rejected;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return Caller::Rejected;
        };
        match decoded.split_once(':') {
            Some((user, password)) => self.check_user(user, password),
            None => Caller::Rejected,
        }
    }

    fn check_user(&self, user: &str, password: &str) -> Caller {
        if user == self.user && password == self.password {
            Caller::User(user.to_string())
        } else {
            Caller::Rejected
        }
    }

    fn respond(&self, request: TokenRequest) -> Response<Full<Bytes>> {
        if let Some(service) = &request.service {
            if *service != self.service {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    &format!("unknown service {service:?}, expected {:?}", self.service),
                );
            }
        }
        let subject = match request.caller {
            Caller::Rejected => {
                tracing::info!("rejected a token request with wrong credentials");
                let mut response = error_response(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "invalid username or password",
                );
                response.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Basic realm=\"hatoba-testenv\""),
                );
                return response;
            }
            Caller::Anonymous => String::new(),
            Caller::User(user) => user,
        };

        let access = if subject.is_empty() {
            Vec::new()
        } else {
            grant(&request.scopes)
        };
        let now = unix_now();
        let token = match self
            .issuer
            .issue(&subject, &self.service, access.clone(), now)
        {
            Ok(token) => token,
            Err(error) => {
                tracing::error!(%error, "failed to issue a token");
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "INTERNAL",
                    &error.to_string(),
                );
            }
        };
        tracing::info!(
            subject = %if subject.is_empty() { "<anonymous>" } else { &subject },
            scopes = ?request.scopes,
            granted = access.len(),
            "issued a token"
        );

        let body = TokenResponse {
            token: token.clone(),
            access_token: token,
            expires_in: TOKEN_LIFETIME_SECS,
            issued_at: rfc3339(now),
        };
        json_response(StatusCode::OK, &body)
    }
}

/// Grants a valid user every requested repository or registry scope,
/// limited to the actions that distribution defines.
fn grant(scopes: &[String]) -> Vec<Access> {
    scopes
        .iter()
        .filter_map(|scope| parse_scope(scope))
        .filter(|access| access.kind == "repository" || access.kind == "registry")
        .map(|mut access| {
            access
                .actions
                .retain(|action| GRANTABLE_ACTIONS.contains(&action.as_str()));
            access
        })
        .collect()
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
    json_response(status, &body)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Formats seconds since the Unix epoch as an RFC 3339 UTC time.
fn rfc3339(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date, counting
/// in 400-year eras of 146097 days that start on March 1st.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::signature::Verifier;

    struct KeyPair {
        _dir: tempfile::TempDir,
        key: PathBuf,
        cert: PathBuf,
    }

    fn key_pair() -> KeyPair {
        let dir = tempfile::tempdir().expect("create temp dir");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        ensure_certificate(&key, &cert).expect("openssl generates a key pair");
        KeyPair {
            _dir: dir,
            key,
            cert,
        }
    }

    fn decode_part(part: &str) -> serde_json::Value {
        let bytes = URL_SAFE_NO_PAD.decode(part).expect("base64url part");
        serde_json::from_slice(&bytes).expect("json part")
    }

    #[test]
    fn scope_parses_type_name_and_actions() {
        let access = parse_scope("repository:private/busybox:pull,push").expect("valid scope");

        assert_eq!(access.kind, "repository");
        assert_eq!(access.name, "private/busybox");
        assert_eq!(access.actions, ["pull", "push"]);
    }

    #[test]
    fn scope_name_may_contain_a_port() {
        let access = parse_scope("repository:127.0.0.1:5002/busybox:pull").expect("valid scope");

        assert_eq!(access.name, "127.0.0.1:5002/busybox");
        assert_eq!(access.actions, ["pull"]);
    }

    #[test]
    fn scope_without_actions_is_rejected() {
        assert_eq!(parse_scope("repository"), None);
        assert_eq!(parse_scope("repository:name"), None);
    }

    #[test]
    fn grant_drops_unknown_actions_and_types() {
        let scopes = vec![
            "repository:a:pull,push,frobnicate".to_string(),
            "weird:b:pull".to_string(),
        ];

        let granted = grant(&scopes);

        assert_eq!(granted.len(), 1);
        assert_eq!(granted[0].actions, ["pull", "push"]);
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_704_067_199), "2023-12-31T23:59:59Z");
    }

    #[test]
    fn issued_token_is_signed_and_carries_claims() {
        let pair = key_pair();
        let issuer =
            TokenIssuer::from_pem_files(&pair.key, &pair.cert, "issuer-x").expect("load keys");
        let access = vec![Access {
            kind: "repository".to_string(),
            name: "private/busybox".to_string(),
            actions: vec!["pull".to_string()],
        }];

        let token = issuer
            .issue("hatoba", "service-y", access.clone(), 1_000)
            .expect("sign");

        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode_part(parts[0]);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        let pem = std::fs::read_to_string(&pair.cert).expect("read cert");
        let der = certificate_der(&pem).expect("cert der");
        assert_eq!(header["x5c"][0], STANDARD.encode(der));

        let claims: Claims = serde_json::from_value(decode_part(parts[1])).expect("claims decode");
        assert_eq!(claims.iss, "issuer-x");
        assert_eq!(claims.sub, "hatoba");
        assert_eq!(claims.aud, "service-y");
        assert_eq!(claims.iat, 1_000);
        assert_eq!(claims.exp, 1_300);
        assert!(claims.nbf <= 1_000);
        assert_eq!(claims.access, access);

        let key_pem = std::fs::read_to_string(&pair.key).expect("read key");
        let private = RsaPrivateKey::from_pkcs8_pem(&key_pem).expect("key");
        let verifier = VerifyingKey::<Sha256>::new(private.to_public_key());
        let signature_bytes = URL_SAFE_NO_PAD.decode(parts[2]).expect("signature");
        let signature = Signature::try_from(signature_bytes.as_slice()).expect("signature");
        let signing_input = format!("{}.{}", parts[0], parts[1]);
        verifier
            .verify(signing_input.as_bytes(), &signature)
            .expect("signature verifies with the certificate's key");
    }

    async fn start_server(pair: &KeyPair) -> String {
        let issuer =
            TokenIssuer::from_pem_files(&pair.key, &pair.cert, "hatoba-testenv").expect("keys");
        let server = Arc::new(TokenServer {
            issuer,
            service: "svc".to_string(),
            user: "user".to_string(),
            password: "secret".to_string(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(server.serve(listener));
        format!("http://{addr}/token")
    }

    fn claims_of(body: &serde_json::Value) -> Claims {
        let token = body["token"].as_str().expect("token field");
        assert_eq!(body["access_token"], body["token"]);
        assert_eq!(body["expires_in"], 300);
        assert!(body["issued_at"].as_str().is_some_and(|t| t.ends_with('Z')));
        let payload = token.split('.').nth(1).expect("payload");
        serde_json::from_value(decode_part(payload)).expect("claims")
    }

    #[tokio::test]
    async fn server_grants_valid_user_the_requested_scope() {
        let pair = key_pair();
        let url = start_server(&pair).await;

        let response = reqwest::Client::new()
            .get(&url)
            .query(&[
                ("service", "svc"),
                ("scope", "repository:private/x:pull,push"),
            ])
            .basic_auth("user", Some("secret"))
            .send()
            .await
            .expect("request");

        assert_eq!(response.status(), 200);
        let claims = claims_of(&response.json().await.expect("json"));
        assert_eq!(claims.sub, "user");
        assert_eq!(claims.aud, "svc");
        assert_eq!(claims.access.len(), 1);
        assert_eq!(claims.access[0].name, "private/x");
        assert_eq!(claims.access[0].actions, ["pull", "push"]);
    }

    #[tokio::test]
    async fn server_gives_anonymous_caller_no_access() {
        let pair = key_pair();
        let url = start_server(&pair).await;

        let response = reqwest::Client::new()
            .get(&url)
            .query(&[("service", "svc"), ("scope", "repository:private/x:pull")])
            .send()
            .await
            .expect("request");

        assert_eq!(response.status(), 200);
        let claims = claims_of(&response.json().await.expect("json"));
        assert_eq!(claims.sub, "");
        assert!(claims.access.is_empty());
    }

    #[tokio::test]
    async fn server_rejects_wrong_password() {
        let pair = key_pair();
        let url = start_server(&pair).await;

        let response = reqwest::Client::new()
            .get(&url)
            .query(&[("service", "svc"), ("scope", "repository:private/x:pull")])
            .basic_auth("user", Some("wrong"))
            .send()
            .await
            .expect("request");

        assert_eq!(response.status(), 401);
    }

    #[tokio::test]
    async fn server_accepts_password_grant_form() {
        let pair = key_pair();
        let url = start_server(&pair).await;

        let response = reqwest::Client::new()
            .post(&url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(
                "grant_type=password&username=user&password=secret&service=svc\
                 &scope=repository%3Aprivate%2Fx%3Apull",
            )
            .send()
            .await
            .expect("request");

        assert_eq!(response.status(), 200);
        let claims = claims_of(&response.json().await.expect("json"));
        assert_eq!(claims.access[0].actions, ["pull"]);
    }

    #[tokio::test]
    async fn server_rejects_unknown_service() {
        let pair = key_pair();
        let url = start_server(&pair).await;

        let response = reqwest::Client::new()
            .get(&url)
            .query(&[("service", "other")])
            .send()
            .await
            .expect("request");

        assert_eq!(response.status(), 400);
    }
}
