{{/* Names, labels and the pieces every component shares. */}}

{{- define "meridian.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meridian.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "meridian.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "meridian.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "meridian.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: meridian
{{- end -}}

{{/* selector labels of one component: (dict "ctx" . "component" "node") */}}
{{- define "meridian.selector" -}}
app.kubernetes.io/name: {{ include "meridian.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "meridian.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "meridian.svcDomain" -}}
{{- printf "%s.svc.%s" .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- define "meridian.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{- define "meridian.tlsSecret" -}}
{{- if eq .Values.tls.source "secret" }}{{ .Values.tls.existingSecret }}{{ else }}{{ include "meridian.fullname" . }}-tls{{ end -}}
{{- end -}}

{{- define "meridian.ownerSecret" -}}
{{- .Values.auth.ownerPassword.existingSecret | default (printf "%s-owner" (include "meridian.fullname" .)) -}}
{{- end -}}

{{- define "meridian.routerName" -}}
{{- printf "%s-router" (include "meridian.fullname" .) -}}
{{- end -}}

{{/* (dict "ctx" . "region" $r): the region's StatefulSet and Service name */}}
{{- define "meridian.nodeName" -}}
{{- printf "%s-node-%s" (include "meridian.fullname" .ctx) .region.name -}}
{{- end -}}

{{- define "meridian.etcdName" -}}
{{- printf "%s-etcd" (include "meridian.fullname" .) -}}
{{- end -}}

{{/* etcd endpoints, comma-separated: the chart's own or the external list */}}
{{- define "meridian.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := include "meridian.etcdName" . -}}
{{- printf "https://%s.%s:2379" $name (include "meridian.svcDomain" .) -}}
{{- else -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the etcd client's ca.crt (and tls.crt, tls.key), or "". */}}
{{- define "meridian.etcdClientSecret" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "%s-etcd-client" (include "meridian.fullname" .) -}}
{{- else -}}
{{- .Values.etcd.external.tlsSecret -}}
{{- end -}}
{{- end -}}

{{- define "meridian.etcdClientCert" -}}
{{- if or .Values.etcd.enabled .Values.etcd.external.clientCert }}true{{ end -}}
{{- end -}}

{{/* etcd flags shared by node and router, one YAML list item each */}}
{{- define "meridian.etcdArgs" -}}
- --etcd={{ include "meridian.etcdEndpoints" . }}
{{- if include "meridian.etcdClientSecret" . }}
- --etcd-ca=/etc/meridian/etcd/ca.crt
{{- if include "meridian.etcdClientCert" . }}
- --etcd-cert=/etc/meridian/etcd/tls.crt
- --etcd-key=/etc/meridian/etcd/tls.key
{{- end }}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.user }}
- --etcd-user={{ .Values.etcd.external.user }}
{{- end }}
{{- end -}}

{{- define "meridian.etcdEnv" -}}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.user }}
- name: MERIDIAN_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.etcd.external.passwordSecret.name }}
      key: {{ .Values.etcd.external.passwordSecret.key }}
{{- end }}
{{- end -}}

{{- define "meridian.etcdMount" -}}
{{- if include "meridian.etcdClientSecret" . }}
- name: etcd-client
  mountPath: /etc/meridian/etcd
  readOnly: true
{{- end }}
{{- end -}}

{{- define "meridian.etcdVolume" -}}
{{- if include "meridian.etcdClientSecret" . }}
- name: etcd-client
  secret:
    secretName: {{ include "meridian.etcdClientSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "meridian.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/meridian/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "meridian.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "meridian.tlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/*
A settings map as flags: (dict "settings" $map "reserved" $list "what" "node.settings").
true: --flag, false: --no-flag, anything else: --flag=value. A flag the chart
sets itself is refused: its value has a place of its own.
*/}}
{{- define "meridian.settingsArgs" -}}
{{- range $flag, $value := .settings }}
{{- if or (hasPrefix "-" $flag) (not (regexMatch "^[a-z][a-z0-9-]*$" $flag)) }}
{{- fail (printf "%s: %q is not a flag name: write it without dashes in front, e.g. replication-concurrency" $.what $flag) }}
{{- end }}
{{- if has $flag $.reserved }}
{{- fail (printf "%s: --%s is set by the chart; use its own value instead (see helm/meridian/README.md)" $.what $flag) }}
{{- end }}
{{- if kindIs "bool" $value }}
- {{ if $value }}--{{ $flag }}{{ else }}--no-{{ $flag }}{{ end }}
{{- else if kindIs "invalid" $value }}
{{- fail (printf "%s: --%s has no value" $.what $flag) }}
{{- else if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
- {{ printf "--%s=%d" $flag (int64 $value) | quote }}
{{- else }}
- {{ printf "--%s=%v" $flag $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "meridian.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "meridian.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Does every region name an address reachable from outside the cluster? */}}
{{- define "meridian.regionsAdvertised" -}}
{{- $all := true -}}
{{- range .Values.regions }}{{ if not .advertise }}{{ $all = false }}{{ end }}{{ end -}}
{{- if and $all .Values.regions }}true{{ end -}}
{{- end -}}

{{/* containerd's hosts.toml: (dict "server" URL "mirror" URL "ca" path-or-"") */}}
{{- define "meridian.hostsToml" -}}
# written by the meridian chart's containerd DaemonSet
server = {{ .server | quote }}

[host.{{ .mirror | quote }}]
  capabilities = ["pull", "resolve"]
{{- if .ca }}
  ca = {{ .ca | quote }}
{{- end }}
{{- end -}}
