//! The policy routing TPROXY needs: a packet capture marked is delivered to the node's own
//! sockets whatever its destination (`ip rule add fwmark 0x111/0xfff lookup 1337` and
//! `ip route add local 0.0.0.0/0 dev lo table 1337`, and the IPv6 pair), set over netlink in
//! the calling thread's network namespace; and the lookup of the interface a local pod's
//! address is routed through (its pod link), for the strict source check on pod links.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::sys::AsyncSocket as _;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use thiserror::Error;

/// The mark capture gives the packets it sends to weft's listeners (Istio's, within
/// [`MARK_MASK`]).
pub const TPROXY_MARK: u32 = 0x111;
/// The bits of the packet mark weft sets and matches: other programs' bits (kube-proxy's
/// 0x4000, Calico's upper ones) are kept.
pub const MARK_MASK: u32 = 0xfff;
/// The routing table with the local route for marked packets.
pub const ROUTE_TABLE: u32 = 1337;
/// The priority of weft's rule: before the main table's (32766).
pub const RULE_PRIORITY: u32 = 32760;

/// The loopback device's index, the same in every network namespace (LOOPBACK_IFINDEX).
const LOOPBACK: u32 = 1;

/// What went wrong reading or changing the policy routing.
#[derive(Debug, Error)]
pub enum RoutingError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel refused a request, or answered garbage.
    #[error("{action}: {source}")]
    Netlink {
        /// What weft was doing.
        action: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

/// Why a local pod's link is not known (yet); the lookup is tried again at the next check.
#[derive(Debug, Error)]
pub enum PodLinkError {
    /// The node has no route to the pod's address at all.
    #[error("no route to the pod: {0}")]
    NoRoute(#[source] rtnetlink::Error),
    /// The address is routed as something other than a unicast route to a link (the node's
    /// own address, a blackhole, …).
    #[error("the pod's address is routed as {kind:?}, not to a link")]
    NotUnicast { kind: RouteType },
    /// The route leaves through a gateway: the pod's own route is not there yet (CNI not
    /// done), and this is the node's way out.
    #[error("the pod's address is routed via a gateway (its own route is not there yet)")]
    Gateway,
    /// The route's interface carries routes via gateways: an uplink, which must never get the
    /// strict check (its traffic may be asymmetric).
    #[error("the pod's address is routed through uplink {link} (its own route is not there yet)")]
    Uplink { link: String },
    /// The route names no interface, or one the kernel does not know by name.
    #[error("the pod's route names no interface weft can name (index {index:?})")]
    NoInterface { index: Option<u32> },
    /// Netlink itself failed.
    #[error(transparent)]
    Routing(#[from] RoutingError),
}

/// One of the two families weft routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    fn version(self) -> IpVersion {
        match self {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        }
    }

    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    /// `local 0.0.0.0/0 dev lo table ROUTE_TABLE` (or `::/0`).
    fn route(self) -> RouteMessage {
        fn local<T>(builder: RouteMessageBuilder<T>) -> RouteMessage {
            builder
                .output_interface(LOOPBACK)
                .table_id(ROUTE_TABLE)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build()
        }
        match self {
            Family::V4 => local(
                RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0),
            ),
            Family::V6 => local(
                RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(Ipv6Addr::UNSPECIFIED, 0),
            ),
        }
    }
}

/// Whether `rule` is weft's: its mark, mask, table and priority.
fn is_ours(rule: &RuleMessage) -> bool {
    let has = |wanted: RuleAttribute| rule.attributes.contains(&wanted);
    rule.header.action == RuleAction::ToTable
        && (has(RuleAttribute::Table(ROUTE_TABLE)) || u32::from(rule.header.table) == ROUTE_TABLE)
        && has(RuleAttribute::FwMark(TPROXY_MARK))
        && has(RuleAttribute::FwMask(MARK_MASK))
        && has(RuleAttribute::Priority(RULE_PRIORITY))
}

/// Whether `route` is weft's local route.
fn is_our_route(route: &RouteMessage) -> bool {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    table == ROUTE_TABLE
        && route.header.kind == RouteType::Local
        && route.header.destination_prefix_length == 0
        && route.attributes.contains(&RouteAttribute::Oif(LOOPBACK))
}

fn netlink(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let action = action.into();
    move |source| RoutingError::Netlink { action, source }
}

/// A netlink handle in the calling thread's network namespace; its connection runs on the
/// current runtime until the handle is dropped.
fn connect() -> Result<Handle, RoutingError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink handle whose dumps the kernel filters by the request's attributes (strict
/// checking): listing weft's route table then does not list every route of the node, which
/// on a node with many routes (a CNI speaking BGP) would cost each table check dearly.
fn connect_filtered() -> Result<Handle, RoutingError> {
    let (mut connection, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    connection
        .socket_mut()
        .socket_mut()
        .set_netlink_get_strict_chk(true)
        .map_err(RoutingError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn rules(handle: &Handle, family: Family) -> Result<Vec<RuleMessage>, RoutingError> {
    handle
        .rule()
        .get(family.version())
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("listing {} rules", family.name())))
}

/// The routes of `family`, of `table` only if given (which only a [`connect_filtered`]
/// handle's kernel honours).
async fn routes(
    handle: &Handle,
    family: Family,
    table: Option<u32>,
) -> Result<Vec<RouteMessage>, RoutingError> {
    let mut query = RouteMessage::default();
    query.header.address_family = family.address_family();
    query.attributes.extend(table.map(RouteAttribute::Table));
    handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("listing {} routes", family.name())))
}

/// Installs weft's rule and local route for both families where they are missing; running it
/// again changes nothing.
pub async fn install() -> Result<(), RoutingError> {
    let handle = connect()?;
    for family in Family::ALL {
        if !rules(&handle, family).await?.iter().any(is_ours) {
            let mut add = handle.rule().add();
            add.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(MARK_MASK));
            let add = add
                .action(RuleAction::ToTable)
                .table_id(ROUTE_TABLE)
                .fw_mark(TPROXY_MARK)
                .priority(RULE_PRIORITY);
            let added = match family {
                Family::V4 => add.v4().execute().await,
                Family::V6 => add.v6().execute().await,
            };
            added.map_err(netlink(format!("adding the {} rule", family.name())))?;
        }
        handle
            .route()
            .add(family.route())
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("adding the {} local route", family.name())))?;
    }
    Ok(())
}

/// What of weft's policy routing is missing, in words (empty when all of it is there).
pub async fn missing() -> Result<Vec<String>, RoutingError> {
    let handle = connect_filtered()?;
    let mut missing = Vec::new();
    for family in Family::ALL {
        if !rules(&handle, family).await?.iter().any(is_ours) {
            missing.push(format!(
                "{} rule fwmark {TPROXY_MARK:#x}/{MARK_MASK:#x}",
                family.name()
            ));
        }
        if !routes(&handle, family, Some(ROUTE_TABLE))
            .await?
            .iter()
            .any(is_our_route)
        {
            missing.push(format!(
                "{} local route in table {ROUTE_TABLE}",
                family.name()
            ));
        }
    }
    Ok(missing)
}

/// Removes weft's rules and local routes, whether or not they are there.
pub async fn remove() -> Result<(), RoutingError> {
    let handle = connect()?;
    for family in Family::ALL {
        for rule in rules(&handle, family).await?.into_iter().filter(is_ours) {
            handle
                .rule()
                .del(rule)
                .execute()
                .await
                .map_err(netlink(format!("removing the {} rule", family.name())))?;
        }
        for route in routes(&handle, family, None)
            .await?
            .into_iter()
            .filter(is_our_route)
        {
            handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(netlink(format!(
                    "removing the {} local route",
                    family.name()
                )))?;
        }
    }
    Ok(())
}

/// Looks up pod links on one netlink connection: the interfaces local pods' addresses are
/// routed through, never an uplink.
pub struct PodLinks {
    handle: Handle,
    /// Interfaces some route leaves through a gateway: the node's uplinks.
    uplinks: BTreeSet<u32>,
}

impl PodLinks {
    /// Connects and reads which interfaces are uplinks (those carrying a route via a gateway).
    pub async fn connect() -> Result<Self, RoutingError> {
        let handle = connect()?;
        let mut uplinks = BTreeSet::new();
        for family in Family::ALL {
            for route in routes(&handle, family, None).await? {
                if gateway(&route) {
                    uplinks.extend(oif(&route));
                    for a in &route.attributes {
                        if let RouteAttribute::MultiPath(hops) = a {
                            uplinks.extend(hops.iter().map(|hop| hop.interface_index));
                        }
                    }
                }
            }
        }
        Ok(Self { handle, uplinks })
    }

    /// The name of the interface `pod`'s address is routed through (`ip route get POD`), if
    /// that is a link to the pod and not the node's way out.
    pub async fn of(&self, pod: IpAddr) -> Result<String, PodLinkError> {
        let query = match pod {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(v4, 32)
                .build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(v6, 128)
                .build(),
        };
        // A destination makes this a lookup (one answer), not a dump.
        let route = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_next()
            .await
            .map_err(PodLinkError::NoRoute)?
            .ok_or(PodLinkError::NoInterface { index: None })?;
        if route.header.kind != RouteType::Unicast {
            return Err(PodLinkError::NotUnicast {
                kind: route.header.kind,
            });
        }
        if gateway(&route) {
            return Err(PodLinkError::Gateway);
        }
        let index = oif(&route).ok_or(PodLinkError::NoInterface { index: None })?;
        let name = self.name(index).await?;
        if self.uplinks.contains(&index) || index == LOOPBACK {
            return Err(PodLinkError::Uplink { link: name });
        }
        Ok(name)
    }

    async fn name(&self, index: u32) -> Result<String, PodLinkError> {
        let link = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(netlink(format!("reading interface {index}")))?;
        link.into_iter()
            .flat_map(|link| link.attributes)
            .find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            })
            .ok_or(PodLinkError::NoInterface { index: Some(index) })
    }
}

/// Whether `route` leaves through a gateway (a next hop of its family, an IPv6 one for IPv4,
/// or several: ECMP is only ever an uplink's).
fn gateway(route: &RouteMessage) -> bool {
    route.attributes.iter().any(|a| {
        matches!(
            a,
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_)
        )
    })
}

/// The interface `route` leaves by.
fn oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read only: the machine's own routes are listed, never changed. Its main table has
    /// routes and weft's table none, so a dump the kernel did not filter would show them.
    #[tokio::test]
    async fn the_filtered_dump_lists_weft_s_table_only() {
        let all = routes(&connect().expect("netlink"), Family::V4, None)
            .await
            .expect("every route");
        assert!(!all.is_empty(), "this machine has routes");
        let ours = routes(
            &connect_filtered().expect("netlink"),
            Family::V4,
            Some(ROUTE_TABLE),
        )
        .await
        .expect("weft's table");
        assert!(ours.is_empty(), "{} routes listed", ours.len());
    }
}
