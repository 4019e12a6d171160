//! JWT bearer tokens (jsonwebtoken). Each issuer pins its algorithm, so a token cannot
//! choose `none` or switch an RSA issuer to HMAC with the public key as the secret; keys
//! come from PEM, an HMAC secret or a JWKS file and are matched by `kid`.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Identity;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// The only algorithm accepted from this issuer, e.g. `"RS256"`.
    pub algorithm: String,
    /// HMAC secret for HS256/384/512.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key for RS*/PS*/ES*/EdDSA.
    #[serde(default)]
    pub public_key: Option<String>,
    /// A JWKS document (re-read on reload); keys are matched by `kid`.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWKS URL, fetched at start, before a reloaded configuration goes live, every
    /// `jwks_refresh`, and (at most every 10 s) when a token names an unknown `kid`.
    /// `https` unless `jwks_allow_http`: keys fetched in clear text can be replaced.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_allow_http: bool,
    #[serde(default = "default_jwks_refresh", deserialize_with = "seconds")]
    pub jwks_refresh: u64,
    /// Accepted `aud` values; empty = `aud` not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default = "default_leeway", deserialize_with = "seconds")]
    pub leeway: u64,
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    #[serde(default)]
    pub plan_claim: Option<String>,
    #[serde(default)]
    pub default_plan: Option<String>,
}

fn default_leeway() -> u64 {
    30
}
fn default_jwks_refresh() -> u64 {
    300
}
fn default_consumer_claim() -> String {
    "sub".to_string()
}
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    crate::base::time::parse_duration(&text)
        .map(|d: Duration| d.as_secs())
        .map_err(serde::de::Error::custom)
}

/// Why a token was refused; the text goes into the `invalid_token` error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    AlgorithmNotAllowed,
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    MissingConsumer,
}

impl TokenError {
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "invalid token: malformed",
            TokenError::AlgorithmNotAllowed => "invalid token: algorithm not allowed",
            TokenError::UnknownKid => "invalid token: unknown key id",
            TokenError::BadSignature => "invalid token: bad signature",
            TokenError::Expired => "invalid token: expired",
            TokenError::NotYetValid => "invalid token: not yet valid",
            TokenError::WrongAudience => "invalid token: wrong audience",
            TokenError::WrongIssuer => "invalid token: unknown issuer",
            TokenError::MissingConsumer => "invalid token: no consumer claim",
        }
    }
}

type Keys = Vec<(Option<String>, DecodingKey)>;

struct Issuer {
    config: IssuerConfig,
    algorithm: Algorithm,
    /// Swapped whole when a JWKS URL is fetched again.
    keys: arc_swap::ArcSwap<Keys>,
    validation: Validation,
    /// A token named a `kid` this issuer's JWKS lacks: the refresher fetches it again
    /// (keys may have rotated).
    refetch: std::sync::atomic::AtomicBool,
}

fn parse_jwks(text: &str) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| e.to_string())?;
    set.keys
        .iter()
        .map(|jwk| {
            DecodingKey::from_jwk(jwk)
                .map(|key| (jwk.common.key_id.clone(), key))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Every configured issuer, compiled once per configuration.
#[derive(Default)]
pub struct JwtVerifier {
    issuers: Vec<Issuer>,
}

impl JwtVerifier {
    /// Builds the verifier; `base` resolves relative `jwks_file` paths. Errors name the issuer.
    pub fn from_config(issuers: &[IssuerConfig], base: &std::path::Path) -> Result<Self, String> {
        let mut built = Vec::new();
        for config in issuers {
            let algorithm: Algorithm = config
                .algorithm
                .parse()
                .map_err(|_| format!("issuer {}: unknown algorithm {:?}", config.issuer, config.algorithm))?;
            let mut keys = Vec::new();
            let is_hmac = matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
            let sources = [
                config.secret.is_some(),
                config.public_key.is_some(),
                config.jwks_file.is_some(),
                config.jwks_url.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(format!(
                    "issuer {}: give exactly one of `secret`, `public_key`, `jwks_file`, `jwks_url`",
                    config.issuer
                ));
            }
            if let Some(url) = &config.jwks_url
                && !config.jwks_allow_http
                && !url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            {
                return Err(format!(
                    "issuer {}: jwks_url must be https:// (or set jwks_allow_http = true)",
                    config.issuer
                ));
            }
            if let Some(secret) = &config.secret {
                if !is_hmac {
                    return Err(format!("issuer {}: `secret` is only for HS256/384/512", config.issuer));
                }
                keys.push((None, DecodingKey::from_secret(secret.as_bytes())));
            }
            if let Some(pem) = &config.public_key {
                let pem = pem.as_bytes();
                let key = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                    _ if is_hmac => {
                        return Err(format!(
                            "issuer {}: HS* needs `secret`, not `public_key`",
                            config.issuer
                        ));
                    }
                    _ => DecodingKey::from_rsa_pem(pem),
                }
                .map_err(|e| format!("issuer {}: public_key: {e}", config.issuer))?;
                keys.push((None, key));
            }
            if let Some(file) = &config.jwks_file {
                let path = base.join(file);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("issuer {}: jwks_file {}: {e}", config.issuer, path.display()))?;
                keys = parse_jwks(&text)
                    .map_err(|e| format!("issuer {}: jwks_file {}: {e}", config.issuer, path.display()))?;
            }
            let mut validation = Validation::new(algorithm);
            validation.leeway = config.leeway;
            validation.validate_nbf = true;
            validation.set_issuer(&[&config.issuer]);
            if config.audiences.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&config.audiences);
            }
            built.push(Issuer {
                config: config.clone(),
                algorithm,
                keys: arc_swap::ArcSwap::from_pointee(keys),
                validation,
                refetch: std::sync::atomic::AtomicBool::new(false),
            });
        }
        Ok(JwtVerifier { issuers: built })
    }

    /// Issuers whose keys come from a URL: (index, url, refresh interval).
    pub fn jwks_urls(&self) -> Vec<(usize, String, Duration)> {
        self.issuers
            .iter()
            .enumerate()
            .filter_map(|(i, issuer)| {
                let url = issuer.config.jwks_url.clone()?;
                Some((i, url, Duration::from_secs(issuer.config.jwks_refresh.max(1))))
            })
            .collect()
    }

    /// Takes the fetched keys of `previous`'s issuers with the same JWKS URL, so a reloaded
    /// configuration verifies tokens from its first request.
    pub fn inherit(&self, previous: &JwtVerifier) {
        for issuer in &self.issuers {
            let Some(url) = &issuer.config.jwks_url else { continue };
            if let Some(old) = previous
                .issuers
                .iter()
                .find(|old| old.config.jwks_url.as_ref() == Some(url))
            {
                issuer.keys.store(old.keys.load_full());
            }
        }
    }

    /// URL issuers with no keys yet (a failed fetch) or asked to fetch again by a token
    /// with an unknown `kid` since the last fetch.
    pub fn wanted(&self) -> Vec<usize> {
        self.issuers
            .iter()
            .enumerate()
            .filter(|(_, issuer)| issuer.config.jwks_url.is_some())
            .filter(|(_, issuer)| {
                issuer.refetch.load(std::sync::atomic::Ordering::Relaxed) || issuer.keys.load().is_empty()
            })
            .map(|(index, _)| index)
            .collect()
    }

    /// Installs a freshly fetched JWKS document for issuer `index`; returns the key count.
    pub fn set_jwks(&self, index: usize, text: &str) -> Result<usize, String> {
        let issuer = self.issuers.get(index).ok_or("no such issuer")?;
        let keys = parse_jwks(text)?;
        let count = keys.len();
        issuer.keys.store(Arc::new(keys));
        issuer.refetch.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(count)
    }

    /// Verifies `token`; `default_plan` applies when neither claim nor issuer names one.
    pub fn verify(&self, token: &str, default_plan: &str) -> Result<Identity, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let mut error = TokenError::AlgorithmNotAllowed;
        for issuer in self.issuers.iter().filter(|i| i.algorithm == header.alg) {
            let mut key_found = false;
            let loaded = issuer.keys.load();
            let keys = loaded
                .iter()
                .filter(|(kid, _)| header.kid.is_none() || kid.is_none() || *kid == header.kid);
            for (_, key) in keys {
                key_found = true;
                let decoded =
                    jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &issuer.validation);
                match decoded {
                    Ok(data) => return identity(&issuer.config, &data.claims, default_plan),
                    Err(e) => {
                        error = match e.kind() {
                            JwtErrorKind::ExpiredSignature => TokenError::Expired,
                            JwtErrorKind::ImmatureSignature => TokenError::NotYetValid,
                            JwtErrorKind::InvalidAudience => TokenError::WrongAudience,
                            JwtErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                            JwtErrorKind::InvalidSignature => TokenError::BadSignature,
                            _ => TokenError::Malformed,
                        };
                        // A claim failed on a good signature: no other key or issuer will do better.
                        if !matches!(error, TokenError::BadSignature | TokenError::WrongIssuer) {
                            return Err(error);
                        }
                    }
                }
            }
            if !key_found && error == TokenError::AlgorithmNotAllowed {
                error = TokenError::UnknownKid;
                if issuer.config.jwks_url.is_some() {
                    issuer.refetch.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Err(error)
    }
}

fn identity(
    config: &IssuerConfig,
    claims: &serde_json::Map<String, serde_json::Value>,
    default_plan: &str,
) -> Result<Identity, TokenError> {
    let consumer = claims
        .get(&config.consumer_claim)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .ok_or(TokenError::MissingConsumer)?;
    let plan = config
        .plan_claim
        .as_ref()
        .and_then(|claim| claims.get(claim))
        .and_then(|v| v.as_str())
        .or(config.default_plan.as_deref())
        .unwrap_or(default_plan);
    // Usage is charged per consumer: every token of one consumer shares its quota.
    Ok(Identity::new(
        compact_str::format_compact!("jwt:{consumer}"),
        Arc::from(consumer),
        Arc::from(plan),
    ))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const RSA_PRIVATE: &str = include_str!("../../tests/fixtures/jwt/rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("../../tests/fixtures/jwt/rsa_public.pem");

    fn issuer(algorithm: &str) -> IssuerConfig {
        IssuerConfig {
            issuer: "https://auth.test/".into(),
            algorithm: algorithm.into(),
            secret: None,
            public_key: None,
            jwks_file: None,
            jwks_url: None,
            jwks_allow_http: false,
            jwks_refresh: 300,
            audiences: vec!["geo".into()],
            leeway: 0,
            consumer_claim: "sub".into(),
            plan_claim: Some("plan".into()),
            default_plan: None,
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut base = json!({"iss": "https://auth.test/", "aud": "geo", "sub": "acme", "exp": now() + 600});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    fn hs(secret: &str, kid: Option<&str>, claims: &serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn hmac_issuer_checks_every_claim() {
        let mut config = issuer("HS256");
        config.secret = Some("s3cret".into());
        let verifier = JwtVerifier::from_config(&[config], std::path::Path::new(".")).unwrap();
        let ok = verifier
            .verify(&hs("s3cret", None, &claims(json!({"plan": "pro"}))), "default")
            .unwrap();
        assert_eq!((&*ok.consumer_id, &*ok.plan), ("acme", "pro"));
        let no_plan = verifier
            .verify(&hs("s3cret", None, &claims(json!({}))), "default")
            .unwrap();
        assert_eq!(&*no_plan.plan, "default");
        let check = |c: serde_json::Value| verifier.verify(&hs("s3cret", None, &claims(c)), "d").unwrap_err();
        assert_eq!(check(json!({"exp": now() - 10})), TokenError::Expired);
        assert_eq!(check(json!({"nbf": now() + 600})), TokenError::NotYetValid);
        assert_eq!(check(json!({"aud": "other"})), TokenError::WrongAudience);
        assert_eq!(check(json!({"iss": "https://evil.test/"})), TokenError::WrongIssuer);
        assert_eq!(check(json!({"sub": ""})), TokenError::MissingConsumer);
        assert_eq!(
            verifier
                .verify(&hs("wrong", None, &claims(json!({}))), "d")
                .unwrap_err(),
            TokenError::BadSignature
        );
        assert_eq!(verifier.verify("not.a.jwt", "d").unwrap_err(), TokenError::Malformed);
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhY21lIn0.";
        assert_eq!(verifier.verify(none, "d").unwrap_err(), TokenError::Malformed);
    }

    #[test]
    fn rsa_issuer_rejects_hmac_signed_with_its_public_key() {
        let mut config = issuer("RS256");
        config.public_key = Some(RSA_PUBLIC.into());
        let verifier = JwtVerifier::from_config(&[config], std::path::Path::new(".")).unwrap();
        let token = encode(
            &Header::new(Algorithm::RS256),
            &claims(json!({})),
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(&*verifier.verify(&token, "d").unwrap().consumer_id, "acme");
        // The classic confusion attack: HS256 with the public key as the HMAC secret.
        let forged = hs(RSA_PUBLIC, None, &claims(json!({})));
        assert_eq!(
            verifier.verify(&forged, "d").unwrap_err(),
            TokenError::AlgorithmNotAllowed
        );
    }

    #[test]
    fn jwks_keys_match_by_kid_and_rotate_on_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        let oct = |kid: &str, secret: &str| {
            use base64::Engine;
            json!({"kty": "oct", "kid": kid, "alg": "HS256",
                   "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)})
        };
        std::fs::write(&jwks, json!({"keys": [oct("k1", "one")]}).to_string()).unwrap();
        let mut config = issuer("HS256");
        config.jwks_file = Some("jwks.json".into());
        let build = || JwtVerifier::from_config(std::slice::from_ref(&config), dir.path()).unwrap();
        let verifier = build();
        assert!(verifier.verify(&hs("one", Some("k1"), &claims(json!({}))), "d").is_ok());
        let rotated = hs("two", Some("k2"), &claims(json!({})));
        assert_eq!(verifier.verify(&rotated, "d").unwrap_err(), TokenError::UnknownKid);
        std::fs::write(&jwks, json!({"keys": [oct("k1", "one"), oct("k2", "two")]}).to_string()).unwrap();
        assert_eq!(&*build().verify(&rotated, "d").unwrap().key_id, "jwt:acme");
    }

    #[test]
    fn ecdsa_eddsa_and_pss_issuers() {
        let cases: [(&str, Algorithm, &str, EncodingKey); 3] = [
            (
                "ES256",
                Algorithm::ES256,
                include_str!("../../tests/fixtures/jwt/ec_public.pem"),
                EncodingKey::from_ec_pem(include_bytes!("../../tests/fixtures/jwt/ec_private.pem")).unwrap(),
            ),
            (
                "EdDSA",
                Algorithm::EdDSA,
                include_str!("../../tests/fixtures/jwt/ed_public.pem"),
                EncodingKey::from_ed_pem(include_bytes!("../../tests/fixtures/jwt/ed_private.pem")).unwrap(),
            ),
            (
                "PS256",
                Algorithm::PS256,
                RSA_PUBLIC,
                EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
            ),
        ];
        for (name, algorithm, public, private) in cases {
            let mut config = issuer(name);
            config.public_key = Some(public.into());
            let verifier = JwtVerifier::from_config(&[config], std::path::Path::new(".")).unwrap();
            let token = encode(&Header::new(algorithm), &claims(json!({})), &private).unwrap();
            assert_eq!(&*verifier.verify(&token, "d").unwrap().consumer_id, "acme", "{name}");
            let expired = encode(&Header::new(algorithm), &claims(json!({"exp": now() - 5})), &private).unwrap();
            assert_eq!(
                verifier.verify(&expired, "d").unwrap_err(),
                TokenError::Expired,
                "{name}"
            );
        }
    }

    #[test]
    fn bad_issuer_config_is_reported() {
        let config = issuer("RS256");
        let error = JwtVerifier::from_config(&[config], std::path::Path::new("."))
            .err()
            .unwrap();
        assert!(error.contains("public_key"), "{error}");
        let mut config = issuer("HS999");
        config.secret = Some("x".into());
        assert!(JwtVerifier::from_config(&[config], std::path::Path::new(".")).is_err());
    }
}
