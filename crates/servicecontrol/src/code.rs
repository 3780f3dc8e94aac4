//! `google.rpc.Code`: the canonical status codes, shared by the proxy (ESP's error bodies,
//! report labels) and the control plane (Google's REST error bodies, `Operation.error`).
//!
//! One enum so that a number like `14` is written once, as [`Code::Unavailable`], and the
//! HTTP status and canonical name that go with it cannot drift between the two sides.

use serde::{Deserialize, Serialize};

/// The canonical codes, with Google's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// Every code, in numeric order.
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The numeric value (what ESP's error body carries as `code`).
    pub const fn as_i32(self) -> i32 {
        self as i32
    }

    /// The code for a number; numbers outside 0..=16 are `Unknown`, as gRPC treats them.
    pub const fn from_i32(n: i32) -> Code {
        if n >= 0 && n < Code::ALL.len() as i32 {
            Code::ALL[n as usize]
        } else {
            Code::Unknown
        }
    }

    /// The canonical name (`UNAVAILABLE`), as gcloud prints it and ESP logs it.
    pub const fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The code for a canonical name (`"UNAVAILABLE"`); `None` for anything else.
    pub fn from_name(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The HTTP status Google's HTTP mapping (and ESP) gives the code.
    pub const fn http_status(self) -> u16 {
        match self {
            Code::Ok => 200,
            Code::Cancelled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code for an HTTP status, for errors that start life as a status (a backend's or
    /// Service Control's answer): the inverse of [`Code::http_status`] where that is one to
    /// one, `FailedPrecondition` for other 4xx and `Internal` for other 5xx.
    // The exact statuses are listed before the 4xx range they fall in: the first arm wins, so
    // the range only catches the rest.
    #[allow(clippy::match_overlapping_arm)]
    pub const fn from_http_status(status: u16) -> Code {
        match status {
            200..=299 => Code::Ok,
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::Aborted,
            416 => Code::OutOfRange,
            429 => Code::ResourceExhausted,
            499 => Code::Cancelled,
            501 => Code::Unimplemented,
            503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            400..=499 => Code::FailedPrecondition,
            _ => Code::Internal,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialised as the number, as `google.rpc.Status.code` is in proto3 JSON.
impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(self.as_i32())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Code::from_i32(i32::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn numbers_round_trip_and_out_of_range_is_unknown() {
        for (n, c) in Code::ALL.into_iter().enumerate() {
            assert_eq!(c.as_i32(), n as i32);
            assert_eq!(Code::from_i32(n as i32), c);
            assert_eq!(Code::from_name(c.name()), Some(c));
        }
        assert_eq!(Code::from_i32(17), Code::Unknown);
        assert_eq!(Code::from_i32(-1), Code::Unknown);
        assert_eq!(Code::from_name("unavailable"), None);
    }

    #[test]
    fn http_mapping_is_googles() {
        let expected = [
            200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401,
        ];
        for (c, s) in Code::ALL.into_iter().zip(expected) {
            assert_eq!(c.http_status(), s, "{c}");
        }
        // The inverse holds wherever the forward mapping is one to one.
        for c in [
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::Unimplemented,
            Code::Unavailable,
            Code::Unauthenticated,
        ] {
            assert_eq!(Code::from_http_status(c.http_status()), c);
        }
        assert_eq!(Code::from_http_status(418), Code::FailedPrecondition);
        assert_eq!(Code::from_http_status(502), Code::Internal);
    }

    #[test]
    fn serialises_as_the_number() {
        assert_eq!(serde_json::to_string(&Code::Unavailable).unwrap(), "14");
        let c: Code = serde_json::from_str("16").unwrap();
        assert_eq!(c, Code::Unauthenticated);
    }
}
