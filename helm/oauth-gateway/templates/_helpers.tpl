{{/* Names, labels and the few values the templates derive. */}}

{{- define "oauth-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oauth-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "oauth-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oauth-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oauth-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "oauth-gateway.labels" -}}
helm.sh/chart: {{ include "oauth-gateway.chart" . }}
{{ include "oauth-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: oauth-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "oauth-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "oauth-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "oauth-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Name of the Secret the chart creates (redis URL and/or credentials). */}}
{{- define "oauth-gateway.secretName" -}}
{{- include "oauth-gateway.fullname" . }}
{{- end }}

{{/* Secret data the chart owns: empty when every secret comes from existing Secrets. */}}
{{- define "oauth-gateway.secretData" -}}
{{- if not .Values.redis.existingSecret }}
redis-url: {{ .Values.redis.url | b64enc | quote }}
{{- end }}
{{- if not .Values.credentials.existingSecret }}
{{- $keys := .Values.credentials.keys }}
{{- with .Values.credentials.introspectionClientSecret }}
{{ $keys.introspectionClientSecret }}: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.credentials.tokenDigestKey }}
{{ $keys.tokenDigestKey }}: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.credentials.ssoClientSecret }}
{{ $keys.ssoClientSecret }}: {{ . | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A setting's value as an environment string. Helm reads every YAML number as a float, which
would print 104857600 as 1.048576e+08: whole numbers are printed as integers.
*/}}
{{- define "oauth-gateway.envValue" -}}
{{- $v := . }}
{{- if kindIs "bool" $v }}
{{- ternary "true" "false" $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) }}
{{- if eq (float64 $v) (float64 (int64 $v)) }}
{{- int64 $v }}
{{- else }}
{{- $v }}
{{- end }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* GATEWAY_SHUTDOWN_TIMEOUT in whole seconds, rounded up (the gateway's default is 20). */}}
{{- define "oauth-gateway.shutdownTimeout" -}}
{{- $t := float64 (dig "shutdown_timeout" 20 .Values.config) }}
{{- $whole := int64 $t }}
{{- if gt $t (float64 $whole) }}{{ add1 $whole }}{{ else }}{{ $whole }}{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the gateway's drain, then a margin
for closing pools. An explicit value that is not longer than preStop + drain is refused:
the kubelet would SIGKILL requests that the gateway was still finishing.
*/}}
{{- define "oauth-gateway.terminationGracePeriodSeconds" -}}
{{- $drain := int64 (include "oauth-gateway.shutdownTimeout" .) }}
{{- $preStop := int64 .Values.lifecycle.preStopSleepSeconds }}
{{- $required := add $preStop $drain }}
{{- with .Values.lifecycle.terminationGracePeriodSeconds }}
{{- if le (int64 .) $required }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%d) must be greater than lifecycle.preStopSleepSeconds + config.shutdown_timeout (%d)" (int64 .) $required) }}
{{- end }}
{{- int64 . }}
{{- else }}
{{- add $required (int64 .Values.lifecycle.terminationGraceBufferSeconds) }}
{{- end }}
{{- end }}

{{/* PromQL matchers selecting this release's series (prometheusRule.selector or the job). */}}
{{- define "oauth-gateway.promSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "job=\"%s-metrics\", namespace=\"%s\"" (include "oauth-gateway.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Volume of a service identity's certificate Secret: a DNS label made of its name. */}}
{{- define "oauth-gateway.identityVolume" -}}
{{- printf "identity-%s" (regexReplaceAll "[^a-z0-9-]" (lower .) "-") | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Variable holding a basic-auth identity's username or password (list name identity field):
the identity's `env` entry, else ANAPLAN_<NAME>_USERNAME / _PASSWORD.
*/}}
{{- define "oauth-gateway.identityEnv" -}}
{{- $name := index . 0 }}
{{- $id := index . 1 }}
{{- $field := index . 2 }}
{{- dig "env" $field (printf "ANAPLAN_%s_%s" (regexReplaceAll "[^A-Z0-9_]" (upper $name) "_") (upper $field)) $id }}
{{- end }}
