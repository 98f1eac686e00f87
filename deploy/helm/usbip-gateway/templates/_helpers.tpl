{{/* Names and labels. */}}
{{- define "usbip-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "usbip-gateway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "usbip-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "usbip-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "server"). */}}
{{- define "usbip-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "usbip-gateway.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "usbip-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "usbip-gateway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference; call with an image values map and $. */}}
{{- define "usbip-gateway.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "usbip-gateway.serverTLSSecret" -}}
{{- if .Values.server.tls.certManager.enabled -}}
{{- printf "%s-server-tls" (include "usbip-gateway.fullname" .) -}}
{{- else -}}
{{- required "server.tls.secretName (a Secret with tls.crt, tls.key, ca.crt) or server.tls.certManager.enabled is required" .Values.server.tls.secretName -}}
{{- end -}}
{{- end -}}

{{- define "usbip-gateway.clientTLSSecret" -}}
{{- if .Values.client.tls.certManager.enabled -}}
{{- printf "%s-client-tls" (include "usbip-gateway.fullname" .) -}}
{{- else -}}
{{- required "client.tls.secretName (a Secret with tls.crt, tls.key, ca.crt) or client.tls.certManager.enabled is required" .Values.client.tls.secretName -}}
{{- end -}}
{{- end -}}

{{- define "usbip-gateway.policyConfigMap" -}}
{{- if .Values.server.policy.existingConfigMap -}}
{{- .Values.server.policy.existingConfigMap -}}
{{- else -}}
{{- printf "%s-policy" (include "usbip-gateway.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "usbip-gateway.hasPolicy" -}}
{{- if or .Values.server.policy.existingConfigMap .Values.server.policy.rules -}}true{{- end -}}
{{- end -}}

{{/*
TOML. Helm reads numbers in values as floats and its toToml writes 16777216 as
1.6777216e+07, which the gateway (rightly) refuses for an integer key, so the chart
writes its own: one level of tables, scalars and lists of scalars; whole numbers as
integers.
*/}}
{{- define "usbip-gateway.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) -}}
{{- if eq (float64 $v) (floor $v) -}}{{- int64 $v -}}{{- else -}}{{- $v -}}{{- end -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i }}, {{ end -}}{{- include "usbip-gateway.tomlValue" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "cannot write %v (%s) into the gateway's TOML" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{- define "usbip-gateway.toml" -}}
{{- range $table, $keys := . }}
[{{ $table }}]
{{- if not (kindIs "map" $keys) }}
{{- fail (printf "config.%s must be a table of keys" $table) }}
{{- end }}
{{- range $key, $value := $keys }}
{{ $key }} = {{ include "usbip-gateway.tomlValue" $value }}
{{- end }}
{{ end -}}
{{- end -}}

{{/* server.toml: the user's config under the keys the pod layout fixes. */}}
{{- define "usbip-gateway.serverToml" -}}
{{- $managed := dict
  "server" (dict
    "listen" (list (printf "0.0.0.0:%d" (int .Values.server.port)))
    "upstream" (printf "127.0.0.1:%d" (int .Values.server.usbipd.port)))
  "tls" (dict
    "cert" "/etc/usbip-gateway/tls/tls.crt"
    "key" "/etc/usbip-gateway/tls/tls.key"
    "ca" "/etc/usbip-gateway/tls/ca.crt"
    "min_version" .Values.server.tls.minVersion)
  "metrics" (dict
    "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))
    "status" .Values.metrics.status.exposed
    "device_label" .Values.metrics.deviceLabel) -}}
{{- if .Values.metrics.status.loopbackPort -}}
{{- $_ := set (index $managed "metrics") "status_listen" (printf "127.0.0.1:%d" (int .Values.metrics.status.loopbackPort)) -}}
{{- end -}}
{{- if include "usbip-gateway.hasPolicy" . -}}
{{- $_ := set $managed "policy" (dict
    "file" "/etc/usbip-gateway/policy/policy.rules"
    "watch" true
    "watch_interval" .Values.server.policy.watchInterval
    "revoke_on_reload" .Values.server.policy.revokeOnReload) -}}
{{- end -}}
{{- if .Values.server.audit.enabled -}}
{{- $_ := set $managed "audit" (dict "path" "-") -}}
{{- end -}}
{{- if .Values.server.tls.crl.configMap -}}
{{- $_ := set (index $managed "tls") "crl" "/etc/usbip-gateway/crl/crl.pem" -}}
{{- end -}}
{{- with (.Values.server.reverse | default dict) -}}
{{- if .dial -}}
{{- $reverse := dict "dial" .dial "pool" (int (.pool | default 2)) -}}
{{- if .name -}}
{{- $_ := set $reverse "name" .name -}}
{{- end -}}
{{- $_ := set $managed "reverse" $reverse -}}
{{- end -}}
{{- end -}}
{{- $config := mergeOverwrite (deepCopy (.Values.server.config | default dict)) $managed -}}
# usbip-gateway server, rendered by the Helm chart. Paths are the pod's mounts.
{{ include "usbip-gateway.toml" $config }}
{{- end -}}

{{- define "usbip-gateway.clientToml" -}}
{{- $server := required "client.server (HOST:PORT of a server gateway) is required when client.enabled" .Values.client.server -}}
{{- $section := dict "listen" (list .Values.client.listen) "server" $server -}}
{{- if .Values.client.serverName -}}
{{- $_ := set $section "server_name" .Values.client.serverName -}}
{{- end -}}
{{- $managed := dict
  "client" $section
  "tls" (dict
    "cert" "/etc/usbip-gateway/tls/tls.crt"
    "key" "/etc/usbip-gateway/tls/tls.key"
    "ca" "/etc/usbip-gateway/tls/ca.crt"
    "min_version" .Values.client.tls.minVersion)
  "metrics" (dict
    "listen" .Values.client.metrics.listen
    "status" (or .Values.metrics.status.exposed (eq (include "usbip-gateway.isLoopback" .Values.client.metrics.listen) "true"))
    "device_label" .Values.metrics.deviceLabel) -}}
{{- if .Values.client.tls.crl.configMap -}}
{{- $_ := set (index $managed "tls") "crl" "/etc/usbip-gateway/crl/crl.pem" -}}
{{- end -}}
{{- $config := mergeOverwrite (deepCopy (.Values.client.config | default dict)) $managed -}}
# usbip-gateway client, rendered by the Helm chart. Paths are the pod's mounts.
{{ include "usbip-gateway.toml" $config }}
{{- end -}}

{{/* host:port -> port */}}
{{- define "usbip-gateway.port" -}}
{{- $parts := splitList ":" . -}}
{{- last $parts -}}
{{- end -}}

{{/* "true" if HOST:PORT is on loopback: /status may be served there. */}}
{{- define "usbip-gateway.isLoopback" -}}
{{- $host := trimSuffix (printf ":%s" (include "usbip-gateway.port" .)) . | trimPrefix "[" | trimSuffix "]" -}}
{{- or (hasPrefix "127." $host) (eq $host "::1") (eq $host "localhost") -}}
{{- end -}}

{{- define "usbip-gateway.loopbackHost" -}}
{{- $host := trimSuffix (printf ":%s" (include "usbip-gateway.port" .)) . | trimPrefix "[" | trimSuffix "]" -}}
{{- if or (eq $host "0.0.0.0") (eq $host "::") (eq $host "") -}}127.0.0.1{{- else -}}{{ $host }}{{- end -}}
{{- end -}}
