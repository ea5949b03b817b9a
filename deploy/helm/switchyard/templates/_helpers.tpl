{{- define "switchyard.name" -}}switchyard{{- end -}}

{{- define "switchyard.fullname" -}}
{{- if contains "switchyard" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-switchyard" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "switchyard.labels" -}}
app.kubernetes.io/name: switchyard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: switchyard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mesh-agent
{{- end -}}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "switchyard.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "switchyard.caSecretName" -}}
{{- if .Values.ca.existingSecret -}}{{ .Values.ca.existingSecret }}{{- else -}}{{ include "switchyard.fullname" . }}-ca{{- end -}}
{{- end -}}

{{- define "switchyard.signerName" -}}{{ include "switchyard.fullname" . | trunc 56 | trimSuffix "-" }}-signer{{- end -}}

{{/* The ConfigMap with the root that verifies workload certificates (and the CA). */}}
{{- define "switchyard.rootConfigMap" -}}
{{- if eq .Values.ca.mode "signer" -}}switchyard-ca-root{{- else -}}{{ .Values.ca.rootCertConfigMap }}{{- end -}}
{{- end -}}

{{- define "switchyard.caAddress" -}}
{{- if eq .Values.ca.mode "signer" -}}
https://{{ include "switchyard.signerName" . }}.{{ .Release.Namespace }}.svc:15012
{{- else if .Values.ca.address -}}
{{ .Values.ca.address }}
{{- else if eq .Values.ca.mode "istiod" -}}
https://istiod.istio-system.svc:15012
{{- else -}}
{{ fail "ca.address is required with ca.mode=external" }}
{{- end -}}
{{- end -}}
