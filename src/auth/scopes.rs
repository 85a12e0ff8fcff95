//! SMART on FHIR scopes, v1 (`patient/Observation.read`, `system/*.write`, `user/Patient.*`)
//! and v2 (`system/Patient.rs`, `patient/*.cruds`): which FHIR interactions on which resource
//! types a caller may perform, and in which context.

/// What a request does to a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Action {
    fn letter(self) -> char {
        match self {
            Self::Create => 'c',
            Self::Read => 'r',
            Self::Update => 'u',
            Self::Delete => 'd',
            Self::Search => 's',
        }
    }
}

/// Whose data a scope covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    /// Only the patient in the token's context (its compartment).
    Patient,
    /// What the user may see.
    User,
    /// A backend service: everything of the type.
    System,
}

/// One resource scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub context: Context,
    /// A resource type, or `*`.
    pub resource: String,
    /// The interactions, as SMART v2 letters (`cruds`).
    pub permissions: String,
}

impl Scope {
    /// Parses one scope; `None` for what is not a resource scope (`openid`, `launch`, …) or
    /// malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let (context, rest) = text.split_once('/')?;
        let context = match context {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return None,
        };
        let (resource, permissions) = rest.split_once('.')?;
        // v2 may carry a query (`?category=…`); fhirgate does not narrow by it, so such a
        // scope is not honoured rather than honoured too widely.
        if permissions.contains('?') {
            return None;
        }
        let valid_type = resource == "*"
            || (resource.starts_with(|c: char| c.is_ascii_uppercase())
                && resource.bytes().all(|b| b.is_ascii_alphabetic()));
        if !valid_type {
            return None;
        }
        let permissions = match permissions {
            "read" => "rs".to_owned(),
            "write" => "cud".to_owned(),
            "*" => "cruds".to_owned(),
            v2 if !v2.is_empty() && v2.chars().all(|c| "cruds".contains(c)) => {
                // Letters must come in cruds order, each once (SMART v2).
                let ordered: String = "cruds".chars().filter(|c| v2.contains(*c)).collect();
                if ordered != v2 {
                    return None;
                }
                ordered
            }
            _ => return None,
        };
        Some(Self {
            context,
            resource: resource.to_owned(),
            permissions,
        })
    }

    /// The resource scopes in a space-separated scope string.
    pub fn parse_all(text: &str) -> Vec<Self> {
        text.split_whitespace().filter_map(Self::parse).collect()
    }

    fn covers(&self, resource_type: &str, action: Action) -> bool {
        (self.resource == "*" || self.resource == resource_type)
            && self.permissions.contains(action.letter())
    }

    /// Whether this scope grants at least what `other` grants.
    pub fn includes(&self, other: &Scope) -> bool {
        self.context >= other.context
            && (self.resource == "*" || self.resource == other.resource)
            && other
                .permissions
                .chars()
                .all(|c| self.permissions.contains(c))
    }
}

/// The widest context in which `scopes` allow `action` on `resource_type`, if any: a system
/// or user scope beats a patient scope.
pub fn allowed(scopes: &[Scope], resource_type: &str, action: Action) -> Option<Context> {
    scopes
        .iter()
        .filter(|s| s.covers(resource_type, action))
        .map(|s| s.context)
        .max()
}

/// Whether `scopes` allow every interaction on every type in a context wider than a patient's
/// (a batch or transaction may touch anything).
pub fn allows_everything(scopes: &[Scope]) -> bool {
    scopes
        .iter()
        .any(|s| s.context != Context::Patient && s.resource == "*" && s.permissions == "cruds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_scopes_mean_the_same_interactions() {
        let v1 = Scope::parse("system/Observation.read").expect("v1");
        let v2 = Scope::parse("system/Observation.rs").expect("v2");
        assert_eq!(v1, v2);
        assert_eq!(
            Scope::parse("user/*.write").expect("write").permissions,
            "cud"
        );
        assert_eq!(
            Scope::parse("patient/Patient.*").expect("all").permissions,
            "cruds"
        );
        for bad in [
            "openid",
            "launch/patient",
            "system/Observation.rsc",
            "system/observation.rs",
            "system/Observation.x",
            "system/Observation.rs?category=laboratory",
            "admin/Patient.read",
            "system/Observation.",
        ] {
            assert!(Scope::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_widest_context_wins_and_permissions_are_exact() {
        let scopes = Scope::parse_all("patient/Observation.rs system/Patient.r launch openid");
        assert_eq!(scopes.len(), 2);
        assert_eq!(
            allowed(&scopes, "Observation", Action::Search),
            Some(Context::Patient)
        );
        assert_eq!(
            allowed(&scopes, "Patient", Action::Read),
            Some(Context::System)
        );
        assert_eq!(allowed(&scopes, "Patient", Action::Search), None);
        assert_eq!(allowed(&scopes, "Observation", Action::Create), None);
        assert!(!allows_everything(&scopes));
        assert!(allows_everything(&Scope::parse_all("system/*.cruds")));
        assert!(!allows_everything(&Scope::parse_all("patient/*.cruds")));
    }

    #[test]
    fn a_granted_scope_includes_narrower_ones() {
        let wide = Scope::parse("system/*.cruds").expect("wide");
        let narrow = Scope::parse("patient/Claim.c").expect("narrow");
        assert!(wide.includes(&narrow));
        assert!(!narrow.includes(&wide));
        let read = Scope::parse("system/Claim.rs").expect("read");
        assert!(!read.includes(&Scope::parse("system/Claim.c").expect("create")));
    }
}
