//! Room names. The contract's rooms (`org:{org}`, `site:{id}`, `unit:{id}`, `user:{sub}`) are
//! logical; internally every room is qualified by organisation, because site and unit ids are
//! unique only within one. `|` cannot occur in org, site or unit ids, so names never collide.
//!
//! Org-room events about a unit (batches, alerts, status) must not reach users whose token
//! restricts them to other sites. So the org room is split: unrestricted sockets join
//! [`org_all`], restricted ones join [`org_site`] for each of their sites, and such events go to
//! [`unit_event_rooms`]. Every socket of the org also joins [`org`], for events that concern the
//! whole organisation (published `org` events).

use crate::auth::UserClaims;

/// Every socket of the organisation.
pub fn org(org: &str) -> String {
    format!("org|{org}")
}

/// Sockets of the organisation that see every site.
pub fn org_all(org: &str) -> String {
    format!("orgall|{org}")
}

/// Site-restricted sockets of the organisation that may see `site`.
pub fn org_site(org: &str, site: &str) -> String {
    format!("orgsite|{org}|{site}")
}

/// `site:{site}`: explicit `subscribe:site` subscribers.
pub fn site(org: &str, site: &str) -> String {
    format!("site|{org}|{site}")
}

/// `unit:{unit}`: explicit `subscribe:unit` subscribers.
pub fn unit(org: &str, unit: &str) -> String {
    format!("unit|{org}|{unit}")
}

/// What a `subscribe:*` room ([`site`], [`unit`]) names.
#[derive(Debug, PartialEq, Eq)]
pub enum Subscribed<'a> {
    Site(&'a str),
    Unit(&'a str),
}

/// The site or unit a room joined through `subscribe:*` is for; `None` for other rooms.
pub fn subscribed(room: &str) -> Option<Subscribed<'_>> {
    let mut parts = room.splitn(3, '|');
    match (parts.next()?, parts.next()?, parts.next()?) {
        ("site", _, id) => Some(Subscribed::Site(id)),
        ("unit", _, id) => Some(Subscribed::Unit(id)),
        _ => None,
    }
}

/// `user:{sub}`: every tab of one user.
pub fn user(org: &str, sub: &str) -> String {
    format!("user|{org}|{sub}")
}

/// Where an org-room event about a unit of `site` goes.
pub fn unit_event_rooms(org_id: &str, site_id: &str) -> [String; 2] {
    [org_all(org_id), org_site(org_id, site_id)]
}

/// The rooms a socket joins on connect (and re-joins after `auth:refresh`).
pub fn membership(claims: &UserClaims) -> Vec<String> {
    let mut rooms = vec![org(&claims.org_id), user(&claims.org_id, &claims.sub)];
    match &claims.site_ids {
        None => rooms.push(org_all(&claims.org_id)),
        Some(sites) => rooms.extend(sites.iter().map(|s| org_site(&claims.org_id, s))),
    }
    rooms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    #[test]
    fn subscription_rooms_name_their_site_or_unit() {
        assert_eq!(
            subscribed(&site("acme", "s-1")),
            Some(Subscribed::Site("s-1"))
        );
        assert_eq!(
            subscribed(&unit("acme", "u|x")),
            Some(Subscribed::Unit("u|x"))
        );
        assert_eq!(subscribed(&org_site("acme", "s-1")), None);
        assert_eq!(subscribed(&user("acme", "a")), None);
    }

    #[test]
    fn restricted_users_get_site_rooms_instead_of_the_whole_org() {
        let mut claims = UserClaims {
            sub: "a".into(),
            org_id: "acme".into(),
            role: Role::Viewer,
            site_ids: None,
            exp: 0,
        };
        assert!(membership(&claims).contains(&org_all("acme")));
        claims.site_ids = Some(vec!["s-1".into()]);
        let rooms = membership(&claims);
        assert!(!rooms.contains(&org_all("acme")));
        assert!(rooms.contains(&org_site("acme", "s-1")));
        assert!(rooms.contains(&org("acme")));
        assert!(unit_event_rooms("acme", "s-1").contains(&org_site("acme", "s-1")));
    }

    #[test]
    fn same_ids_in_two_orgs_are_different_rooms() {
        assert_ne!(unit("acme", "u-1"), unit("other", "u-1"));
        assert_ne!(site("acme", "x"), unit("acme", "x"));
    }
}
