//! Node authentication in Kubernetes: the node agent's projected ServiceAccount token, bound
//! to an audience and to the agent's pod, reviewed by the cluster's API server (TokenReview)
//! on every call. The token must be for the CA's audience and of the agent's ServiceAccount;
//! the node is the one the token names (`authentication.kubernetes.io/node-name`, Kubernetes
//! 1.30+), else the node of the pod it is bound to.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;

use super::{Authenticator, AuthnError, node_name};

/// The node a bound token was issued on.
pub const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The pod a bound token is bound to.
pub const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The uid of the pod a bound token is bound to.
pub const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Reviews tokens with one cluster's API server.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    namespace: String,
    /// `system:serviceaccount:NAMESPACE:NAME` of the node agent.
    username: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("agent", &self.username)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Reviews through `client` tokens that must be for `audience` and of the ServiceAccount
    /// `namespace/account` (the node agent's).
    pub fn new(client: kube::Client, audience: &str, namespace: &str, account: &str) -> Self {
        Self {
            client,
            audience: audience.to_owned(),
            namespace: namespace.to_owned(),
            username: format!("system:serviceaccount:{namespace}:{account}"),
        }
    }

    /// The node of the pod `name` (of the agent's namespace) the token is bound to, if that
    /// pod is still the one (`uid`).
    async fn bound_pod_node(&self, name: &str, uid: Option<&str>) -> Result<String, AuthnError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod = pods
            .get_opt(name)
            .await
            .map_err(|e| AuthnError::Unavailable(format!("reading the bound pod {name}: {e}")))?
            .ok_or_else(|| AuthnError::NoNode(format!("the bound pod {name} is gone")))?;
        if uid.is_some_and(|uid| pod.metadata.uid.as_deref() != Some(uid)) {
            return Err(AuthnError::NoNode(format!(
                "the token is bound to an earlier pod named {name}"
            )));
        }
        let node = pod
            .spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| AuthnError::NoNode(format!("the bound pod {name} has no node")))?;
        node_name(&node)
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewer {
    async fn authenticate(&self, token: &str) -> Result<String, AuthnError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthnError::Unavailable(format!("TokenReview: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthnError::Refused(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated by the API server".into()),
            ));
        }
        // An API server that ignored the audience asked for has not checked it.
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(AuthnError::Refused(format!(
                "not a token for audience {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(AuthnError::NotTheAgent {
                user: username,
                expected: self.username.clone(),
            });
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| match extra.get(key).map(Vec::as_slice) {
            Some([value]) => Some(value.as_str()),
            _ => None,
        };
        if let Some(node) = one(NODE_NAME) {
            return node_name(node);
        }
        let pod = one(POD_NAME).ok_or_else(|| {
            AuthnError::NoNode("the token is bound to no pod (not a projected token)".into())
        })?;
        self.bound_pod_node(pod, one(POD_UID)).await
    }
}
