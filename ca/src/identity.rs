//! The Wicket identity carried inside every certificate: user, roles, request IDs.

use crate::der::{self, Reader};
use crate::{Error, Result};

/// OID arc owned by Wicket: 2.25.<uuid efbb6db3-2ac8-4db4-8c08-a762bb3f23e7>.
pub(crate) const WICKET_ARC: u128 = 318_658_675_482_869_317_005_080_761_674_720_289_767;

/// 2.25.<wicket>.1: the X.509 extension carrying [`Identity`].
pub(crate) fn identity_oid() -> Vec<u8> {
    der::oid_content(&[2, 25, WICKET_ARC, 1])
}

/// Printable form of the identity extension OID (for docs and `openssl x509 -text`).
pub const IDENTITY_OID: &str = "2.25.318658675482869317005080761674720289767.1";

pub(crate) const SSH_EXT_USER: &str = "wicket-user@wicket.dev";
pub(crate) const SSH_EXT_ROLES: &str = "wicket-roles@wicket.dev";
pub(crate) const SSH_EXT_REQUESTS: &str = "wicket-requests@wicket.dev";
pub(crate) const SSH_EXT_LOGIN_UNTIL: &str = "wicket-login-until@wicket.dev";

/// Who a certificate speaks for: the Wicket user, the roles in force (standing
/// plus granted), the access-request IDs whose grants it carries, and when
/// the password login it descends from ends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub user: String,
    pub roles: Vec<String>,
    pub request_ids: Vec<String>,
    /// The end (Unix seconds) of the password login this certificate was
    /// issued under: certificates reissued from it carry it on unchanged, so
    /// holding a certificate never extends a login. `None` in certificates
    /// made before this field existed, and in the proxy's own upstream ones.
    pub login_until: Option<i64>,
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b':'))
}

impl Identity {
    /// When the login behind a certificate ending at `not_after` ends:
    /// `login_until`, or (certificates from before that field) the
    /// certificate's own end.
    pub fn login_ends(&self, not_after: i64) -> i64 {
        self.login_until.unwrap_or(not_after)
    }

    /// Rejects names that could smuggle separators into certificate fields.
    pub fn validate(&self) -> Result<()> {
        if !valid_token(&self.user) {
            return Err(Error::InvalidRequest(format!(
                "user name {:?} must be 1-128 characters of [A-Za-z0-9._@:-]",
                self.user
            )));
        }
        if self.login_until.is_some_and(|t| t < 0) {
            return Err(Error::InvalidRequest(
                "login end must not be before 1970".into(),
            ));
        }
        for r in self.roles.iter().chain(&self.request_ids) {
            if !valid_token(r) {
                return Err(Error::InvalidRequest(format!(
                    "role or request ID {r:?} must be 1-128 characters of [A-Za-z0-9._@:-]"
                )));
            }
        }
        Ok(())
    }

    /// DER: SEQUENCE { user UTF8String, roles SEQUENCE OF UTF8String,
    /// requests SEQUENCE OF UTF8String, loginUntil INTEGER OPTIONAL }
    pub(crate) fn to_der(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        der::write_nested(&mut out, der::TAG_SEQUENCE, |seq| {
            der::write_tlv(seq, der::TAG_UTF8_STRING, self.user.as_bytes());
            for list in [&self.roles, &self.request_ids] {
                der::write_nested(seq, der::TAG_SEQUENCE, |inner| {
                    for item in list {
                        der::write_tlv(inner, der::TAG_UTF8_STRING, item.as_bytes());
                    }
                });
            }
            if let Some(t) = self.login_until {
                der::write_unsigned_integer(seq, &t.to_be_bytes());
            }
        });
        out
    }

    pub(crate) fn from_der(bytes: &[u8]) -> Result<Self> {
        let bad =
            |e: der::DerError| Error::MalformedCertificate(format!("identity extension: {e}"));
        let mut outer = Reader::new(bytes);
        let mut seq = Reader::new(outer.read(der::TAG_SEQUENCE).map_err(bad)?);
        if !outer.is_empty() {
            return Err(Error::MalformedCertificate(
                "identity extension: trailing bytes".into(),
            ));
        }
        let id = Identity {
            user: seq.read_utf8().map_err(bad)?.to_owned(),
            roles: seq.read_utf8_seq().map_err(bad)?,
            request_ids: seq.read_utf8_seq().map_err(bad)?,
            login_until: if seq.is_empty() {
                None
            } else {
                Some(seq.read_u63().map_err(bad)?)
            },
        };
        if !seq.is_empty() {
            return Err(Error::MalformedCertificate(
                "identity extension: trailing fields".into(),
            ));
        }
        id.validate()?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oid_text_matches_arc() {
        assert_eq!(IDENTITY_OID, format!("2.25.{WICKET_ARC}.1"));
    }

    #[test]
    fn rejects_separators() {
        let id = Identity {
            user: "alice".into(),
            roles: vec!["dba,root".into()],
            request_ids: vec![],
            login_until: None,
        };
        assert!(id.validate().is_err());
        let id = Identity {
            user: "".into(),
            ..Default::default()
        };
        assert!(id.validate().is_err());
        let id = Identity {
            user: "alice".into(),
            login_until: Some(-1),
            ..Default::default()
        };
        assert!(id.validate().is_err());
    }

    #[test]
    fn an_identity_without_a_login_end_still_reads() {
        // What certificates issued before `login_until` existed carry.
        let old = Identity {
            user: "alice".into(),
            roles: vec!["dev".into()],
            request_ids: vec!["r-1".into()],
            login_until: None,
        };
        assert_eq!(Identity::from_der(&old.to_der()).unwrap(), old);
        let new = Identity {
            login_until: Some(1_800_000_000),
            ..old.clone()
        };
        let der = new.to_der();
        assert!(der.len() > old.to_der().len());
        assert_eq!(Identity::from_der(&der).unwrap(), new);
    }

    proptest! {
        #[test]
        fn der_round_trips(user in "[a-z][a-z0-9._-]{0,20}",
                           roles in proptest::collection::vec("[a-z][a-z0-9-]{0,12}", 0..5),
                           reqs in proptest::collection::vec("[0-9a-f-]{1,36}", 0..4),
                           login_until in proptest::option::of(0i64..=i64::MAX)) {
            let id = Identity { user, roles, request_ids: reqs, login_until };
            prop_assert_eq!(Identity::from_der(&id.to_der()).unwrap(), id);
        }

        #[test]
        fn from_der_never_panics(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Identity::from_der(&data);
        }
    }
}
