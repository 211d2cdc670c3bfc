//! `redis://[:PASSWORD@]HOST:PORT[/DB]`: where the Redis is and how to log
//! in. Only `redis://`: TLS to Redis (`rediss://`) is out of scope.

use std::fmt;

/// A parsed `--redis` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `HOST:PORT`, resolved when the link connects (so a node can start
    /// before the name resolves).
    pub addr: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError(pub String);

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--redis: {}", self.0)
    }
}

impl std::error::Error for UrlError {}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, UrlError> {
        let bad = |why: &str| {
            Err(UrlError(format!(
                "{why} (want redis://[:PASSWORD@]HOST:PORT[/DB])"
            )))
        };
        let Some(rest) = url.strip_prefix("redis://") else {
            if url.starts_with("rediss://") {
                return bad("TLS (rediss://) is not supported");
            }
            return bad("the URL must start with redis://");
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((auth, host)) => (Some(auth), host),
            None => (None, rest),
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some(("", pw)) => (None, Some(pw.to_string())),
                Some((user, pw)) => (Some(user.to_string()), Some(pw.to_string())),
                None => (None, Some(a.to_string())),
            },
        };
        let (hostport, db) = match hostpart.split_once('/') {
            None | Some((_, "")) => (hostpart.trim_end_matches('/'), 0),
            Some((hp, db)) => match db.parse::<u32>() {
                Ok(db) => (hp, db),
                Err(_) => return bad("the database must be a number"),
            },
        };
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return bad("the port is missing");
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return bad("bad host or port");
        }
        Ok(RedisUrl {
            addr: hostport.to_string(),
            username,
            password: password.filter(|p| !p.is_empty()),
            db,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_of_the_url() {
        let u = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!(
            (u.addr.as_str(), u.password, u.db),
            ("127.0.0.1:6379", None, 0)
        );
        let u = RedisUrl::parse("redis://:s3cret@localhost:7000/3").unwrap();
        assert_eq!(u.addr, "localhost:7000");
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.db, 3);
        let u = RedisUrl::parse("redis://bob:pw@h:1/").unwrap();
        assert_eq!((u.username.as_deref(), u.db), (Some("bob"), 0));
        for bad in [
            "http://h:1",
            "rediss://h:1",
            "redis://h",
            "redis://h:x",
            "redis://:1",
            "redis://h:1/x",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
