"""The autoscaling controller: scales voice agent worker Deployments from LiveKit room load.

A kopf operator serving `AgentAutoscaler` resources (morgana.dev/v1alpha1, CRD in
charts/morgana/crds/): every `pollIntervalSeconds` it reads the rooms of a LiveKit server,
asks `policy` for the replicas they need, patches the target Deployment's scale
subresource, posts an Event for every scaling decision, re-dispatches agents to rooms left
without one, and writes the resource's status. `morgana-controller` runs it (see `cli`).

RBAC (least privilege)
----------------------
The chart's controller Role (charts/morgana/templates/controller/rbac.yaml) is the single source
of the rules, each commented there; the controller tests run under exactly those rules. In
namespaced mode (WATCH_NAMESPACE=ns1,ns2; the chart's default is its release namespace) that Role
is needed in every watched namespace; nothing cluster-scoped is, since kopf's CRD and Namespace
scanning is off and API discovery is open to every authenticated client. Cluster-wide
(WATCH_NAMESPACE empty), the same rules go in a ClusterRole, with the cluster-scoped
`clusterkopfpeerings` in place of `kopfpeerings`.

The peering object (a KopfPeering named PEERING_NAME in each watched namespace, or a
ClusterKopfPeering) must exist: the chart creates it, so that `helm uninstall` deletes it.
Without the chart, create it yourself, or add `create` to the peering rule and the controller
creates it on its first start.

Stopping for good (`morgana-controller stop`, the chart's pre-delete hook) runs with its own
ServiceAccount: `get` and `deployments/scale` `patch` on the controller's Deployment, `list`
on pods, and `get`, `list` and `patch` on agentautoscalers.
"""
